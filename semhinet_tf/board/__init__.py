"""The board runtime (numpy + Pillow + tflite_runtime; never TensorFlow). See runtime.py."""

from semhinet_tf.board.runtime import BoardModel, iter_image_paths

__all__ = ["BoardModel", "iter_image_paths"]
