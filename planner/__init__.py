"""Planning: measure a deployment's timings (`pdserve profile`) and simulate serving on them."""
