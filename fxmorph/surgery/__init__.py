"""Surgery: every structural rewrite, and the only code that builds modules or writes tensors.

Analysis describes (channel groups, typed rewrite records); passes decide (which channels, layers,
ranks); surgery performs, always on a copy or on a model it built itself:

- :mod:`~fxmorph.surgery.apply`: a WidthPlan applied to the graph (tensors sliced or extended, modules
  rebuilt, width-dependent constants and fix-ups recomputed from the analysis's rewrite records);
- :mod:`~fxmorph.surgery.factors`: a layer split into two low-rank factors, and a pair merged back;
- :mod:`~fxmorph.surgery.gather`: the first Linear's input features gathered to the kept ones;
- :mod:`~fxmorph.surgery.norm_stats`: BatchNorm running statistics of new channels;
- :mod:`~fxmorph.surgery.probes`: probe modules that linearise activations in a gradient-probe copy.
"""
