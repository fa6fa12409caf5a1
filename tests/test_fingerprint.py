"""The θ fingerprint (schemas/fingerprint.py) against a float64 brute force of its definition,
f(θ) = Σ_i θ_i r_{i mod L}, on shapes that take every path: small tensors summed together,
large ones as matrix-vector products with and without a tail, empty and 0-d tensors, and a
second dtype."""

import torch

from attrib.schemas.fingerprint import LENGTH, SMALL, Fingerprint, _vector


def brute_force(tensors: list[torch.Tensor]) -> torch.Tensor:
    values = []
    for index, t in enumerate(tensors):
        r = _vector(index, min(max(t.numel(), 1), LENGTH))
        flat = t.reshape(-1).double()
        values.append((flat * r[torch.arange(flat.numel()) % r.numel()]).sum())
    return torch.stack(values)


def test_fingerprint_equals_its_definition_within_its_tolerance():
    g = torch.Generator().manual_seed(0)
    shapes = [(5,), (300, 7), (SMALL,), (SMALL + 1,), (70000,), (2, LENGTH), (2 * LENGTH + 3,),
              (0,), ()]
    tensors = [torch.randn(s, generator=g) for s in shapes]
    tensors += [torch.randn(3, generator=g, dtype=torch.float64),
                torch.randn(LENGTH + 5, generator=g, dtype=torch.float64)]
    fingerprint = Fingerprint(tensors)
    got, tolerance = fingerprint(tensors), fingerprint.tolerance(tensors)
    assert got.dtype == torch.float64 and got.shape == (len(tensors),)
    expected = brute_force(tensors)
    assert ((got - expected).abs() <= tolerance).all()
    # float64 tensors are summed in float64: far inside the tolerance
    assert torch.allclose(got[-2:], expected[-2:], rtol=1e-12, atol=1e-12)
    # an exact comparison (the recorder's) sees a single entry moved by 1e-2; the tolerance
    # (a reader's) sees a 1% rescale of a 70000-entry tensor; each moves that tensor's only
    for edit, compare in ((lambda t: t[12345].add_(1e-2), lambda new: new != got),
                          (lambda t: t.mul_(1.01), lambda new: (new - got).abs() > tolerance)):
        edited = [t.clone() for t in tensors]
        edit(edited[4])
        assert compare(fingerprint(edited)).tolist() == [i == 4 for i in range(len(tensors))]
