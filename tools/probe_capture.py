"""GPU probe: does a thread-local CUDA-graph capture in one thread break torch.cuda.synchronize()
and launches in another? (global mode does.)"""
import threading, time, torch, sys
mode = sys.argv[1] if len(sys.argv) > 1 else "thread_local"
x = torch.randn(1 << 20, device="cuda")
errors, caps = [], [0]
stop = threading.Event()
def capturer():
    s = torch.cuda.Stream()
    while not stop.is_set():
        g = torch.cuda.CUDAGraph()
        with torch.cuda.stream(s):
            y = x * 2
        with torch.cuda.graph(g, stream=s, capture_error_mode=mode):
            for _ in range(200):
                y = y * 1.0001
        caps[0] += 1
t = threading.Thread(target=capturer); t.start()
n = 0
end = time.time() + 5
while time.time() < end:
    try:
        z = x + 1; torch.cuda.synchronize(); w = torch.empty(1000, device="cuda"); n += 1
    except Exception as e:
        errors.append(repr(e)[:200]); break
stop.set(); t.join()
print(f"mode={mode} serving iterations={n} captures={caps[0]} errors={errors[:1]}")
