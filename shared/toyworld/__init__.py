"""The toy try-on world: a deterministic renderer of flat-style people in tops and bottoms moving as
their captions say (`render`), samples shaped like the paper's data (`samples`), and exact metrics
computed from frames alone (`metrics`). numpy + PIL only (no torch)."""
