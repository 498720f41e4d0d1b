"""Which layers' hidden states make the best routing embedding: an offline check on held-out training texts.

    python benchmarks/routing_layers.py            # minilm on sst2, trec, cr, mr; about 2 minutes on 2 cores

For each task, 1,024 of its training texts (peftkit.serve.routing.sample_texts, seed 0) are embedded once
with the base model (no adapter), keeping every layer's mean-pooled hidden states. The first 512 are the
adapter's routing data (the centroid of all 512; the first --examples of them kept for knn), the other 512
are the queries, routed by peftkit.serve.routing's own two routers, so no test text takes part in choosing
the layers. An embedding built from several layers is their normalized mean-pooled states side by side,
normalized again (what peftkit.serve.routing.embed_texts does with the middle layer and the last). Printed:
the share of queries routed to the right kind of task, counting sst2 and mr (sentences of the same Rotten
Tomatoes reviews) as one, for the nearest-centroid router and the knn router (k=16).

Then the ceiling for telling sst2 from mr: how many of sst2's test sentences appear verbatim (lower-cased,
spaces normalized) in mr, and the held-out accuracy of a logistic regression trained to separate the two
tasks' embeddings (middle + last layer; 512 texts of each to fit, the other 512 of each to score): a
router given labeled examples of both tasks can do no better than that.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

TASKS = ("sst2", "trec", "cr", "mr")
SOURCE = {"sst2": "rt", "mr": "rt", "trec": "trec", "cr": "cr"}


@torch.inference_mode()
def layer_states(model, tokenizer, texts, batch_size=64):
    """(texts, layers + 1, hidden) mean-pooled hidden states of every layer (index 0: the embeddings' output)."""
    out = []
    for start in range(0, len(texts), batch_size):
        encoded = tokenizer(texts[start:start + batch_size], truncation=True, max_length=128, padding=True, return_tensors="pt")
        states = model(**encoded, output_hidden_states=True).hidden_states
        mask = encoded["attention_mask"].unsqueeze(-1).float()
        out.append(torch.stack([(h * mask).sum(1) / mask.sum(1).clamp(min=1) for h in states], 1))
    return torch.cat(out)


def embedding(states, layers):
    return F.normalize(torch.cat([F.normalize(states[:, i], dim=-1) for i in layers], -1), dim=-1)


def routed_right(train, queries, layers, examples, k=16):
    """Share of queries routed to the right kind of task by peftkit's own routers, over routing data built from
    `train` with these layers (the centroid of all, the first `examples` kept)."""
    from peftkit.serve.routing import NearestCentroid, NearestExamples, RoutingData, RoutingTable

    kept = {t: embedding(train[t], layers) for t in TASKS}
    table = RoutingTable.build({t: RoutingData(examples=kept[t][:examples], centroid=F.normalize(kept[t].mean(0), dim=0))
                                for t in TASKS})
    right = {"centroid": [], "knn": []}
    for t in TASKS:
        q = embedding(queries[t], layers)
        for name, router in (("centroid", NearestCentroid()), ("knn", NearestExamples(k=k))):
            right[name].append(sum(SOURCE[c.adapter] == SOURCE[t] for c in router.choose(table, q)) / len(q))
    return {name: 100 * sum(v) / len(v) for name, v in right.items()}


def separable(first, second, layers, steps=500, seed=0) -> float:
    """Held-out accuracy of a logistic regression fitted to tell `first`'s embeddings from `second`'s."""
    torch.manual_seed(seed)
    fit_x = torch.cat([embedding(first[:512], layers), embedding(second[:512], layers)])
    fit_y = torch.cat([torch.zeros(512), torch.ones(512)])
    test_x = torch.cat([embedding(first[512:], layers), embedding(second[512:], layers)])
    test_y = torch.cat([torch.zeros(len(first) - 512), torch.ones(len(second) - 512)])
    probe = torch.nn.Linear(fit_x.shape[1], 1)
    optimizer = torch.optim.Adam(probe.parameters(), lr=1e-2, weight_decay=1e-3)
    for _ in range(steps):
        optimizer.zero_grad()
        F.binary_cross_entropy_with_logits(10 * probe(fit_x).squeeze(1), fit_y).backward()
        optimizer.step()
    with torch.no_grad():
        return 100 * ((probe(test_x).squeeze(1) > 0).float() == test_y).float().mean().item()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--examples", type=int, default=256, help="stored examples per task for knn")
    args = parser.parse_args()
    from peftkit import zoo
    from peftkit.serve.routing import sample_texts

    model, tokenizer = zoo.load_classifier(args.model, num_labels=2)
    model.eval()
    train, queries = {}, {}
    for task in TASKS:
        states = layer_states(model, tokenizer, sample_texts([e.text for e in zoo.load_task(task).train], 1024, 0))
        train[task], queries[task] = states[:512], states[512:]
    last = train[TASKS[0]].shape[1] - 1
    middle = last // 2
    choices = [[last]] + [[i, last] for i in range(1, last)] + [[middle - 1, middle + 1, last]]
    print(f"{args.model}: routing to the right kind of task (sst2 = mr), 512 held-out training texts per task; "
          f"layer {last} is the last, {middle} the middle")
    print(f"| embedding | centroid | knn (k=16, {args.examples} examples kept) |\n|---|---:|---:|")
    for layers in choices:
        scores = routed_right(train, queries, layers, args.examples)
        print(f"| layers {', '.join(map(str, layers))} | {scores['centroid']:.1f}% | {scores['knn']:.1f}% |")
    fewer = routed_right(train, queries, [middle, last], 128)
    print(f"\nmiddle + last with 128 examples kept: knn {fewer['knn']:.1f}%")

    import re

    def norm(text):
        return re.sub(r"\s+", " ", text.lower()).strip()
    mr = zoo.load_task("mr")
    in_mr = {norm(e.text) for e in mr.train} | {norm(e.text) for e in mr.test}
    sst2_test = [norm(e.text) for e in zoo.load_task("sst2").test]
    shared = sum(text in in_mr for text in sst2_test)
    both = {t: torch.cat([train[t], queries[t]]) for t in ("sst2", "mr")}
    print(f"sst2 test sentences found verbatim in mr: {shared:,} of {len(sst2_test):,} ({100 * shared / len(sst2_test):.1f}%)")
    print(f"sst2 against mr, a logistic regression on the middle + last embeddings: {separable(both['sst2'], both['mr'], [middle, last]):.1f}% "
          "on held-out texts (50% is chance)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
