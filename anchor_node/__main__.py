from anchor_node.cli import main

main()
