"""HTTP layer of wsi-sampler (FastAPI apps). Thin over the library; the library never
imports this package."""
