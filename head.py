"""
head.py: the output head's log-probs, a chunk of tokens at a time, so the [tokens, vocab] fp32 logits never exist.

For hidden states h [N, H], the head's weight W [V, H], targets y [N] and a temperature tau, per token:
    z       = head_logits(h, W) / tau         head_logits = h W^T in fp32, never rounded to bf16
    log p   = z[y] - logsumexp(z)             entropy = -sum_v softmax(z)_v log softmax(z)_v
    g       = coef * (onehot(y) - softmax(z)) / tau      = d (coef * log p) / d (h W^T)
    d / d h = g W,   d / d W = g^T h          two GEMMs a chunk
Only `chunk` tokens' logits live at once (1,024 x 152k in fp32: 0.6 GB). Two autograd functions:
    ChunkedTokenLogProb        log p and entropy per token (GRPO); backward recomputes each chunk's logits
    ChunkedWeightedLogProbSum  sum_t w_t log p_t, weights known up front (SFT's loss): the gradients are computed in
                               forward, chunk by chunk, so backward is a multiply (3 head-sized GEMMs a token, not 5)
model.py's forward calls them (inside forward, so that FSDP has the head's weight gathered while they run). Each
chunk's elementwise work runs compiled on CUDA (a few fused kernels, not ten passes over the chunk), eager elsewhere.
"""
import torch


def head_logits(hidden, weight):
    """hidden [N, H] @ weight [V, H]^T -> logits [N, V] in fp32, never rounded to bf16 on the way: a bf16 logit near 20
    is off by up to 0.06, as large as the log-prob changes GRPO's ratio and clip act on, and the sampler's and the
    trainer's logits would round apart. bf16 inputs: products exact in fp32, fp32 sums (CUDA's mm with out_dtype)."""
    if hidden.dtype not in (torch.bfloat16, torch.float16):
        return (hidden @ weight.t()).float()  # fp32 (fp64: the tests' reference) as before
    if hidden.is_cuda and _MM_OUT_DTYPE:
        return torch.mm(hidden, weight.t(), out_dtype=torch.float32)
    return hidden.float() @ weight.float().t()


_MM_OUT_DTYPE = "dtype" in torch.ops.aten.mm.overloads()  # mm(..., out_dtype=): CUDA kernels in recent torch


FUSED_HEAD_DEVICES = ("cuda",)  # where the output head's per-chunk elementwise work runs compiled (tests add "cpu")


def _fused_on_gpu(fn):
    """fn compiled on FUSED_HEAD_DEVICES, eager elsewhere. Eager, each in-place op is a pass over a [chunk, V] fp32 buffer
    (about ten, of 0.6 GB each at 1,024 x 152k); Inductor fuses them into a few kernels. Dynamic: chunk sizes vary.
    Compiled on first use: torch.compile's imports take seconds, and a CPU process never needs them."""
    compiled = []

    def call(logits, *args):
        if logits.device.type not in FUSED_HEAD_DEVICES:
            return fn(logits, *args)
        if not compiled:
            compiled.append(torch.compile(fn, dynamic=True))
        return compiled[0](logits, *args)
    return call


@_fused_on_gpu
def _logp_entropy(logits, targets, temperature):
    """logits [c, V] fp32, targets [c] -> log softmax(logits / temperature)[targets], entropy: [c] fp32.
    z is a new buffer even for fp32 logits (torch 2.11's Inductor, CPU, got the log-probs wrong when it updated its
    input); the entropy's product is taken in place instead, so eager allocates as many [c, V] buffers as before."""
    z = logits.float() / temperature
    z.sub_(torch.logsumexp(z, dim=-1, keepdim=True))  # log-probs, in place
    return z.gather(1, targets[:, None]).squeeze(1), -z.exp().mul_(z).sum(-1)


@_fused_on_gpu
def _logit_grad(logits, targets, coef, temperature, grad_dtype):
    """logits [c, V] fp32, targets [c], coef [c] -> (log p(targets) [c] fp32, g [c, V] in grad_dtype (the hidden
    states', for the two gradient GEMMs)), where g = d sum_t coef_t log p_t / d logits
    = coef / temperature * (onehot(targets) - softmax(logits / temperature)). logits are overwritten and become g."""
    z = logits.div_(temperature)
    target_logit = z.gather(1, targets[:, None])
    m = z.max(dim=-1, keepdim=True).values
    sumexp = z.sub_(m).exp_().sum(dim=-1, keepdim=True)
    g = z.div_(sumexp).neg_().scatter_add_(1, targets[:, None], torch.ones_like(target_logit))  # onehot - softmax
    return (target_logit - (m + sumexp.log())).squeeze(1), g.mul_(coef[:, None].float() / temperature).to(grad_dtype)


def _chunked_head_grads(hidden, weight, targets, coef, chunk, temperature, need_hidden, need_weight):
    """hidden [N, H], weight [V, H], targets [N], coef [N] -> log p(targets) [N] fp32 and the gradients of
    sum_t coef_t log p_t with respect to hidden and weight (None where not needed), `chunk` tokens at a time: one
    [chunk, V] buffer lives at once. The weight's gradient is summed in place in its dtype (as Liger-Kernel's fused
    loss): a bf16 chunk's GEMM adds in fp32, then rounds the running sum. The TF32 GEMM it replaced was an H100 SFT
    step's third-largest kernel (9 ms)."""
    logp = torch.empty(hidden.shape[0], device=hidden.device, dtype=torch.float)
    grad_hidden = torch.empty_like(hidden) if need_hidden else None
    grad_weight = torch.zeros_like(weight) if need_weight else None
    for s in range(0, hidden.shape[0], chunk):
        h, c = hidden[s:s + chunk], slice(s, s + chunk)
        logp[c], g = _logit_grad(head_logits(h, weight), targets[c], coef[c], temperature, h.dtype)  # g [chunk, V]
        if grad_hidden is not None:
            grad_hidden[c] = g @ weight
        if grad_weight is not None:
            grad_weight.addmm_(g.t(), h)
        del g  # free this chunk before the next one is allocated
    return logp, grad_hidden, grad_weight


class ChunkedTokenLogProb(torch.autograd.Function):
    """hidden [N, H], weight [V, H], targets [N] -> log softmax(h W^T / temperature)[target], entropy: [N] fp32 each,
    `chunk` tokens at a time. Forward keeps only [N] results; backward recomputes each chunk's logits:
        d logp / d logits = onehot(target) - softmax(logits)   (scaled by 1/temperature)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk, temperature):
        logp = torch.empty(hidden.shape[0], device=hidden.device, dtype=torch.float)
        entropy = torch.empty_like(logp)
        for s in range(0, hidden.shape[0], chunk):
            logp[s:s + chunk], entropy[s:s + chunk] = _logp_entropy(head_logits(hidden[s:s + chunk], weight),
                                                                    targets[s:s + chunk], temperature)
        ctx.save_for_backward(hidden, weight, targets)
        ctx.chunk, ctx.temperature = chunk, temperature
        ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, _grad_entropy):
        # contiguous: a sum's gradient comes expanded (stride 0), which would compile a second graph
        _, grad_hidden, grad_weight = _chunked_head_grads(*ctx.saved_tensors, grad_logp.contiguous(), ctx.chunk,
                                                          ctx.temperature, *ctx.needs_input_grad[:2])
        return grad_hidden, grad_weight, None, None, None


class ChunkedWeightedLogProbSum(torch.autograd.Function):
    """sum_t w_t log softmax(h_t W^T / temperature)[target_t] for weights w known up front (SFT: the loss
    mask over the step's token count). The gradients are computed chunk by chunk in the forward, so backward
    is a multiply: 3 head-sized matmuls per token, as with full logits, instead of 5 with recomputation."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, weights, chunk, temperature):
        logp, grad_hidden, grad_weight = _chunked_head_grads(hidden, weight, targets, weights, chunk, temperature,
                                                             *ctx.needs_input_grad[:2])
        ctx.save_for_backward(grad_hidden, grad_weight)
        zero = torch.zeros((), device=hidden.device, dtype=torch.float)  # chunk sums: one sum of all N rounds otherwise
        return sum(((weights[s:s + chunk].float() * logp[s:s + chunk]).sum() for s in range(0, len(logp), chunk)), zero)

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight = ctx.saved_tensors  # in place (no second weight-sized buffer); fp32 scalar x bf16: in fp32
        return (None if grad_hidden is None else grad_hidden.mul_(grad_total),
                None if grad_weight is None else grad_weight.mul_(grad_total), None, None, None, None)
