"""Defaults that the command line shows in its help, defined here (a module that imports nothing) so that `scm
--help` and every subcommand's help start without importing torch or numpy. Each is re-exported, and documented, by
the module it belongs to."""

TEACHER_NFE = 35  # a diffusion teacher's default evaluations: EDM's Heun sampler with 18 steps (scm.sampling)
MAX_CONNECTIONS = 256  # `scm serve`: connections open at once before a request is answered 503 (scm.serve.app)
MAX_ERROR = 0.05  # post-hoc EMA: the largest relative L² error of a reconstructed averaging profile (scm.ema_profile)
