import jax, optax
import sharded_checks as sc, lora_jax
from jax.sharding import NamedSharding, PartitionSpec as P
cfg = sc.config(True); spec = sc.lora_spec(cfg); mesh = sc.auto_mesh((2,4),("data","model"))
params = sc.init_params(cfg)
params_sh, lora, derived = sc.sharded_setup(mesh, params, spec)
x, y = sc.batch(cfg)
tx = optax.adam(sc.LR)
opt_state = jax.jit(tx.init, out_shardings=lora_jax.optimizer_shardings(tx, lora))(lora)
xs, ys = (jax.device_put(a, NamedSharding(mesh, P("data", None))) for a in (x, y))
step1 = jax.jit(sc.make_step(sc.make_loss(cfg), tx))
out = step1(lora, opt_state, params_sh, xs, ys)
for name, before, after in [("lora", lora, out[0]), ("opt", opt_state, out[1])]:
    for (kp, a), b in zip(jax.tree_util.tree_flatten_with_path(before)[0], jax.tree_util.tree_leaves(after)):
        if a.sharding != b.sharding: print(name, jax.tree_util.keystr(kp), a.sharding, b.sharding)
