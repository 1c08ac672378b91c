"""Diagnostics of a learned analysis a_θ and of classical filters: what the network learned.

Every diagnostic is a pure function from (an analysis map or a filter's output, a trajectory) to tensors or an
`xarray.Dataset` with named dimensions and units in its attrs; plotting lives in `plots.py`, and `run.py` wires
them for `danlab analyse`. An *analysis map* is any callable `a(x, zeta)` on tensors of shape (..., Nx) that
returns the increment (..., Nx); `net_map` makes one from a trained network (single state, Ne = 1).

- expansion.py: zero-innovation response b, s; the operator expansion a(x, ζ) ≈ P^a(x) ζ, by least squares over
  sampled innovations and by the exact Jacobian
- spectra.py: sorted eigenspectra of P^a (learned vs an ensemble's), translation-averaged rows
- sensitivity.py: translation-averaged second derivatives ∂P^a_{i,i+p}/∂x_{i+q} and their spatial extent
- lyapunov.py: QR iteration of the tangent-linear model (backward Lyapunov vectors, exponents), principal angles
- errors.py: skewness and excess kurtosis of forecast and analysis errors
"""

from danlab.diagnostics.expansion import (net_map, operator_expansion, pa_jacobian, pa_least_squares,
                                          zero_innovation_response)
from danlab.diagnostics.errors import error_moments
from danlab.diagnostics.lyapunov import (lyapunov_spectrum, principal_cosines, subspace_alignment, tangent_qr_step)
from danlab.diagnostics.sensitivity import extent, sensitivity_maps, sensitivity_tensor, translation_average
from danlab.diagnostics.spectra import eigenspectra, ensemble_covariance, sym_eigvals

__all__ = ["net_map", "operator_expansion", "pa_jacobian", "pa_least_squares", "zero_innovation_response",
           "error_moments", "lyapunov_spectrum", "principal_cosines", "subspace_alignment", "tangent_qr_step",
           "extent", "sensitivity_maps", "sensitivity_tensor", "translation_average", "eigenspectra",
           "ensemble_covariance", "sym_eigvals"]
