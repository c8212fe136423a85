"""KServe's Python ``ModelServer`` machinery serving a small custom model on 127.0.0.1 (its
own virtual environment, see ``tests/_tools.py``). Usage: ``python kserve_mean_colour.py
PORT SIZE``. Input ``patches`` UINT8 [-1, SIZE, SIZE, 3]; output ``mean_rgb`` FP32 [-1, 3],
the mean colour of each patch in 0..1.

KServe's ``ModelServer.start`` binds 0.0.0.0; tests bind loopback only, so the same REST
server class runs here on a socket bound to 127.0.0.1."""

from __future__ import annotations

import socket
import sys

import numpy as np
from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer
from kserve.constants.constants import FASTAPI_APP_IMPORT_STRING
from kserve.protocol.rest.server import RESTServer


class MeanColour(Model):
    def __init__(self, size: int) -> None:
        super().__init__("mean-colour")
        self.size = size
        self.ready = True

    def get_input_types(self) -> list[dict[str, object]]:
        return [{"name": "patches", "datatype": "UINT8", "shape": [-1, self.size, self.size, 3]}]

    def get_output_types(self) -> list[dict[str, object]]:
        return [{"name": "mean_rgb", "datatype": "FP32", "shape": [-1, 3]}]

    async def predict(self, payload: InferRequest, headers: dict[str, str] | None = None,
                      response_headers: dict[str, str] | None = None) -> InferResponse:
        patches = payload.inputs[0].as_numpy().astype(np.float32)
        mean = (patches.mean(axis=(1, 2)) / 255.0).astype(np.float32)
        out = InferOutput(name="mean_rgb", shape=list(mean.shape), datatype="FP32")
        out.set_data_from_numpy(mean, binary_data=False)
        return InferResponse(model_name=self.name, infer_outputs=[out],
                             response_id=payload.id)


def main() -> None:
    port, size = int(sys.argv[1]), int(sys.argv[2])
    server = ModelServer(http_port=port, enable_grpc=False)
    server.register_model(MeanColour(size))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    RESTServer(FASTAPI_APP_IMPORT_STRING, server.dataplane, server.model_repository_extension,
               port).run(sockets=[sock])


if __name__ == "__main__":
    main()
