"""MobileNet on CPU: Keras predict_on_batch vs an XLA-compiled call, same weights, same batches.

    python scripts/bench_model.py
"""

import time
import numpy as np
import tensorflow as tf
from imgsim_dask.models import build_model, resolve_weights

model = build_model(resolve_weights("mobilenet", "random"), "/tmp")
x = np.random.default_rng(0).integers(0, 255, (64, 224, 224, 3)).astype(np.float32)
xla = tf.function(lambda t: model(t, training=False), jit_compile=True)
for name, run in (("predict_on_batch", lambda: model.predict_on_batch(x)),
                  ("tf.function jit_compile=True", lambda: xla(x).numpy())):
    run()
    started = time.perf_counter()
    for _ in range(4):
        run()
    print(f"{name}: {4 * 64 / (time.perf_counter() - started):.1f} images/s")
