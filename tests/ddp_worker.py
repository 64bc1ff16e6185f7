"""One rank of tests/test_ddp.py (run under torch.distributed.run, gloo): the example's
ScribbleModel (U-Net + attention block + masked CRF + attentive similarity, fused backends) wrapped
in DDP as examples/scribseg/engine.py does, one backward on this rank's batch; rank 0 saves the
averaged gradients. Usage: python -m torch.distributed.run --nproc_per_node 2 ddp_worker.py OUT"""
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))


def build_model():
    from scribseg.objective import LossConfig, ScribbleModel

    torch.manual_seed(0)
    cfg = LossConfig(asl_from_iteration=0).scaled(32, 8)
    model = ScribbleModel(4, cfg, attention_stage=2)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0  # the comparison needs the same forward in both processes
    return model


def make_batch(rank: int) -> dict:
    g = torch.Generator().manual_seed(100 + rank)
    image = torch.rand(2, 1, 32, 32, generator=g)
    label = torch.randint(0, 4, (2, 32, 32), generator=g)
    scribble = torch.where(torch.rand(2, 32, 32, generator=g) < 0.1, label, torch.full_like(label, 4))
    return {"image": image, "target": scribble, "scribble": scribble, "label": label,
            "gate_label": torch.tensor([1.0, 0.0 if rank else 1.0])}


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    model = build_model()
    ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    loss = ddp(make_batch(rank), iteration=1)["loss"]
    loss.backward()
    if rank == 0:
        torch.save({name: p.grad for name, p in model.named_parameters()}, os.path.join(out, "ddp_grads.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
