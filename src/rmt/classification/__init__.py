"""Image classification with RMT: data, training, evaluation and prediction (``rmt train/eval/predict``)."""
