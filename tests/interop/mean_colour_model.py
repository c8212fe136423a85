"""A small custom model for MLServer (its own virtual environment, see ``tests/_tools.py``):
input ``patches`` UINT8 [-1, H, W, 3], output ``mean_rgb`` FP32 [-1, 3], the mean colour of
each patch in 0..1. Deterministic, so the tests can check every value."""

from __future__ import annotations

import numpy as np
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse


class MeanColour(MLModel):
    async def load(self) -> bool:
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        patches = NumpyCodec.decode_input(payload.inputs[0]).astype(np.float32)
        mean = (patches.mean(axis=(1, 2)) / 255.0).astype(np.float32)
        return InferenceResponse(model_name=self.name, id=payload.id,
                                 outputs=[NumpyCodec.encode_output("mean_rgb", mean)])
