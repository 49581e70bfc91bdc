"""scoring.token_logprobs: the log-probabilities and entropies in chunks of positions."""

from __future__ import annotations

import pytest
import torch


@pytest.mark.parametrize("with_entropy", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_logprobs_are_the_whole_tensors_numbers(with_entropy, temperature):
    """scoring.token_logprobs without grad: the log-softmax formed a few positions at a time gives exactly
    the values of forming it for all positions at once (the probes' and reference pass's numbers unchanged)."""
    from video_ktr.model.scoring import token_logprobs

    g = torch.Generator().manual_seed(0)
    for V in (600, 151_936):
        logits = (torch.randn(3, 7, V, generator=g) * 4).to(torch.bfloat16)
        ids = torch.randint(0, V, (3, 7), generator=g)
        z = torch.log_softmax(logits.float() / temperature, -1)
        whole_logp = z.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
        whole_ent = -(z.exp() * z).sum(-1)
        for chunk in (1, 3 * V * 2, 3 * V * 7, 1 << 26):  # one position per chunk, two, all
            logp, ent = token_logprobs(logits, ids, with_entropy=with_entropy, temperature=temperature,
                                       chunk_elements=chunk)
            assert torch.equal(logp, whole_logp), (V, chunk)
            assert (ent is None) != with_entropy
            if with_entropy:
                assert torch.equal(ent, whole_ent), (V, chunk)
    # with grad (the policy pass) the gradient flows as before
    logits = torch.randn(2, 4, 50, requires_grad=True)
    ids = torch.randint(0, 50, (2, 4))
    logp, ent = token_logprobs(logits, ids, with_entropy=True)
    logp.sum().backward()
    expected = torch.autograd.grad(torch.log_softmax(logits, -1).gather(-1, ids.unsqueeze(-1)).sum(), logits)[0]
    assert torch.allclose(logits.grad, expected) and not ent.requires_grad


def test_policy_pass_entropy_in_chunks_is_the_whole_tensors_entropy():
    """With grad (the policy pass) the entropy summed a few positions at a time equals the whole tensor's bit for bit,
    and log p and its gradient are those of the plain log-softmax."""
    from video_ktr.model.scoring import token_logprobs

    g = torch.Generator().manual_seed(1)
    for V, dtype in ((600, torch.float32), (151_936, torch.bfloat16)):
        base = (torch.randn(3, 7, V, generator=g) * 4).to(dtype)
        ids = torch.randint(0, V, (3, 7), generator=g)
        plain = base.clone().requires_grad_(True)
        z = torch.log_softmax(plain.float() / 0.7, -1)
        whole_logp = z.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
        whole_ent = -(z.detach().exp() * z.detach()).sum(-1)
        (whole_grad,) = torch.autograd.grad(whole_logp.sum(), plain)
        for chunk in (1, 3 * V * 2, 1 << 26):
            logits = base.clone().requires_grad_(True)
            logp, ent = token_logprobs(logits, ids, with_entropy=True, temperature=0.7, chunk_elements=chunk)
            assert torch.equal(logp.detach(), whole_logp.detach()) and torch.equal(ent, whole_ent), (V, chunk)
            assert not ent.requires_grad
            logp.sum().backward()
            assert torch.equal(logits.grad, whole_grad), (V, chunk)

