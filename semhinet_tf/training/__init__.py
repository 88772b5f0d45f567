"""Training, split by job: config (options), strategy (where and how TensorFlow runs), state (the run
directory's training files and --resume), weights (the starting model), compile (optimizer and losses of a
phase), callbacks (what runs at each epoch's end), validation (scores and the review threshold) and loop
(the float phase, then quantization-aware fine-tuning).

`semhinet_tf.train` re-exports the public names for existing callers."""
