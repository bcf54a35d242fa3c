"""Profile a stage script: python prof.py OUT WAIT ACTIVE script.py args...
torch.profiler over ACTIVE logged steps after WAIT (steps counted by model.metrics_logger's log calls), then
cProfile-free summary: GPU busy time vs wall per step, top CPU ops, top CUDA kernels; chrome trace gz."""
import gzip, json, os, runpy, sys, time, shutil
import torch
sys.path.insert(0, os.getcwd())
import model as M

out, wait, active, script, rest = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5:]
acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
state = {"n": 0, "prof": None, "t0": None}


def start():
    state["prof"] = torch.profiler.profile(activities=acts, record_shapes=False, with_stack=False)
    state["prof"].__enter__()
    torch.cuda.synchronize() if torch.cuda.is_available() else None
    state["t0"] = time.time()


def stop():
    torch.cuda.synchronize() if torch.cuda.is_available() else None
    wall = time.time() - state["t0"]
    p = state["prof"]
    p.__exit__(None, None, None)
    ka = p.key_averages()
    busy = sum(e.self_device_time_total for e in ka if e.device_type == torch.autograd.DeviceType.CUDA) / 1e6
    # kernel time only (device events)
    with open(out + ".txt", "w") as f:
        f.write(f"{script} {' '.join(rest)}\nactive steps {active}, wall {wall:.3f}s ({wall / active * 1000:.1f} ms/step), "
                f"GPU self time {busy:.3f}s ({busy / wall * 100:.1f}% busy)\n\n")
        f.write(ka.table(sort_by="self_cpu_time_total", row_limit=45, max_name_column_width=70))
        f.write("\n\n")
        f.write(ka.table(sort_by="self_device_time_total", row_limit=60, max_name_column_width=90))
    print(f"[prof] {out}: wall {wall:.3f}s busy {busy:.3f}s", flush=True)
    state["prof"] = None


orig = M.metrics_logger


def logger(*a, **k):
    log = orig(*a, **k)

    def wrapped(rec):
        log(rec)
        if rec.get("eval"):
            return
        state["n"] += 1
        if state["n"] == wait:
            start()
        elif state["n"] == wait + active and state["prof"] is not None:
            stop()
    return wrapped


M.metrics_logger = logger
sys.argv = [script, *rest]
runpy.run_path(script, run_name="__main__")
