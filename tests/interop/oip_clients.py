"""KServe's and MLServer's own client-side code against our worker (each run in that
tool's virtual environment, see ``tests/_tools.py``). Usage: ``python oip_clients.py
kserve|mlserver URL MODEL``; prints the outputs as JSON.

The request is 4 patches whose pixel values are known: patch i is filled with i * 40."""

from __future__ import annotations

import asyncio
import json
import sys

import numpy as np


def patches(size: int) -> np.ndarray:
    return np.stack([np.full((size, size, 3), i * 40, np.uint8) for i in range(4)])


def kserve_infer(url: str, model: str, size: int) -> dict[str, list[list[float]]]:
    from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig

    async def run() -> dict[str, list[list[float]]]:
        client = InferenceRESTClient(RESTConfig(protocol="v2", timeout=60))
        tensor = InferInput(name="patches", shape=[4, size, size, 3], datatype="UINT8")
        tensor.set_data_from_numpy(patches(size), binary_data=False)
        response = await client.infer(url, InferRequest(model_name=model, infer_inputs=[tensor],
                                                        request_id="kserve-1"),
                                      model_name=model)
        await client.close()
        assert response.id == "kserve-1", response.id
        return {o.name: o.as_numpy().tolist() for o in response.outputs}

    return asyncio.run(run())


def mlserver_infer(url: str, model: str, size: int) -> dict[str, list[list[float]]]:
    import urllib.request

    from mlserver.codecs import NumpyCodec, NumpyRequestCodec
    from mlserver.types import InferenceResponse

    # MLServer ships its types and codecs, not an HTTP client: the request goes by urllib.
    request = NumpyRequestCodec.encode_request(patches(size))
    request.inputs[0].name = "patches"
    request.id = "mlserver-1"
    body = request.model_dump_json(exclude_none=True).encode()
    post = urllib.request.Request(f"{url}/v2/models/{model}/infer", data=body,
                                  headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(post, timeout=60) as raw:
        response = InferenceResponse.model_validate_json(raw.read())
    assert response.id == "mlserver-1", response.id
    return {o.name: NumpyCodec.decode_output(o).tolist() for o in response.outputs}


if __name__ == "__main__":
    kind, url, model, size = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    infer = kserve_infer if kind == "kserve" else mlserver_infer
    sys.stdout.write(json.dumps(infer(url, model, size)) + "\n")
