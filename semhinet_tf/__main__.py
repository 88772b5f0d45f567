"""python -m semhinet_tf: the same commands as `semhinet`."""

from semhinet_tf.cli import main

main(prog_name="semhinet")
