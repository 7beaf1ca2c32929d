"""The ground layer: errors, constants and names every other package builds on.

It imports nothing of the project. The pure packages (paft/, tunnel/,
signalling/, nat/ruleset) import only this and each other; the runtime
(upmt/) and the daemons import all of them. See docs/architecture.md.
"""
