"""The project's artifacts in one place, numpy + stdlib only (the board imports it too).

files.py   atomic writes with unique temporary names, and the up-front check of every output a command writes
run.py     the run directory: its file names, its marker, and the rules for creating, replacing and resuming one
"""
