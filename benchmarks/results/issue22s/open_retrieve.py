import sys, time, numpy as np
t0 = time.perf_counter()
from reasonedit_cli.store import Codebook
from reasonedit_cli import retrieval as R
t1 = time.perf_counter()
cb = Codebook.open(sys.argv[1])
q = np.random.default_rng(0).normal(size=(cb.dim,)).astype(np.float32)
r = R.retrieve(cb, q)
t2 = time.perf_counter()
r = R.retrieve(cb, q + 0.1)
t3 = time.perf_counter()
import resource
print(sys.argv[1], "import %.2f s, open+first retrieve %.3f s, second %.4f s, engine=%s, RSS %d MB" % (t1-t0, t2-t1, t3-t2, cb.engine() is not None, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss//1024))
