"""CPU float32: first-order layer sensitivity (one dense forward + backward per probe) vs the exact per-layer probe
costs measured on the H100 (examples/smollm2-8k-probed/probe_drops_and_nll_rises.json).

For each probe: a dense forward of prompt + answer through patchattn's function (q/k/v captured, the attention output
entering o_proj kept with its gradient), gradients of the answer's log-probability and of the NLL of the prompt's
last 4096 tokens w.r.t. every layer's attention output; then each layer's first-pass plan run on its captured q/k/v
(prompt rows only) gives delta = o_sparse - o_dense, and the first-order change is <grad, delta>.

    python first_order_probe.py [PROBES] [RECIPE]      # from the repository root; about 4.5 minutes a probe at 8K"""
import json, sys, time
import torch
from patchattn.calibrate import needle_probes, tokens_from_text
from patchattn.models import load_model
from patchattn.compiled import compiled_for
from patchattn.patch import ATTN_NAME, capture, patched
from patchattn.prefill import sparse_attention
from patchattn.recipe import Recipe
from patchattn.text import load_text

n_probes = int(sys.argv[1]) if len(sys.argv) > 1 else 4
model, tok = load_model(None, dtype="float32", device="cpu")
for p in model.parameters():
    p.requires_grad_(False)
ids = tokens_from_text(tok, load_text("calibration"), 8192, model.config)
probes = needle_probes(tok, ids, n_probes, 0)
recipe = Recipe.load(sys.argv[2] if len(sys.argv) > 2 else "examples/smollm2-8k-probed/first_pass_recipe.json")
L = len(recipe.layers)
ans_fo, nll_fo = torch.zeros(L), torch.zeros(L)
model.set_attn_implementation(ATTN_NAME)
for pi, probe in enumerate(probes):
    t = time.time()
    n, a = probe.prompt.shape[1], probe.answer.shape[1]
    full = torch.cat([probe.prompt, probe.answer], 1)
    qkv, outs = {}, {}

    def hook(module, q, k, v):
        qkv[module.layer_idx] = (q.detach(), k.detach(), v.detach(), getattr(module, "scaling", None))

    def pre(idx):
        def f(mod, args):
            args[0].retain_grad()
            outs[idx] = args[0]
        return f

    hs = [layer.self_attn.o_proj.register_forward_pre_hook(pre(i)) for i, layer in enumerate(model.model.layers)]
    emb = model.get_input_embeddings()(full).requires_grad_(True)
    with capture(hook):
        out = model(inputs_embeds=emb, logits_to_keep=4096 + a)
    for h in hs:
        h.remove()
    logits = out.logits[0].float()  # positions n + a - 4096 - a ... n + a - 1
    base = n + a - logits.shape[0]
    lp = logits.log_softmax(-1)
    ans_rows = torch.arange(n - 1, n + a - 1) - base
    logp_answer = lp[ans_rows, probe.answer[0]].sum()
    nll_rows = torch.arange(n - 4096 - 1, n - 1) - base
    nll = -lp[nll_rows[nll_rows >= 0], full[0, n - 4096: n][nll_rows >= 0]].mean()
    order = sorted(outs)
    g_ans = torch.autograd.grad(logp_answer, [outs[i] for i in order], retain_graph=True)
    g_nll = torch.autograd.grad(nll, [outs[i] for i in order])
    fwdbwd = time.time() - t
    with patched(model, recipe, backend="torch"):
        compiled = compiled_for(model.config)
        for li in order:
            plan = compiled.layers[li]
            if plan.all_dense:
                continue
            q, k, v, scaling = qkv[li]
            with torch.no_grad():
                o_sp = sparse_attention(plan, q[:, :, :n], k[:, :, :n], v[:, :, :n], compiled.block_size, scaling, "torch")
                o_sp = o_sp.transpose(1, 2).reshape(1, n, -1)
                delta = o_sp - outs[li].detach()[:, :n]
            ans_fo[li] += -(g_ans[order.index(li)][:, :n] * delta).sum() / len(probes)
            nll_fo[li] += (g_nll[order.index(li)][:, :n] * delta).sum() / len(probes)
    print(f"probe {pi}: fwd+bwd {fwdbwd:.0f}s, total {time.time() - t:.0f}s", flush=True)
model.set_attn_implementation("sdpa")
exact = json.load(open("examples/smollm2-8k-probed/probe_drops_and_nll_rises.json"))
ea, en = torch.tensor(exact["answer_drop"]), torch.tensor(exact["nll_rise"])
corr = lambda x, y: float(torch.corrcoef(torch.stack([x, y]))[0, 1])  # noqa: E731
print("layer | answer drop exact / first-order | NLL rise exact / first-order (millinats)")
for li in range(L):
    print(f"{li:2d} | {ea[li]:+.4f} / {ans_fo[li]:+.4f} | {en[li]*1000:+.2f} / {nll_fo[li]*1000:+.2f}")
print(f"correlation: answer {corr(ea, ans_fo):.3f}, NLL {corr(en, nll_fo):.3f}; argmax answer exact {int(ea.argmax())} first-order {int(ans_fo.argmax())}")
