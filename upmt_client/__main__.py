from upmt_client.cli import main

main()
