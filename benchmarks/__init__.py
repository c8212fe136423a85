"""Side-by-side benchmarks of wsi-sampler against the tools a lab would pick instead.

Benchmarks print numbers and ratios; they are not timed tests. See RESULTS.md.
"""
