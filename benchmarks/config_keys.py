"""Config keys with a special role, in a module that imports nothing (the leaderboard's and the report's CLIs
stay free of torch; benchmarks.config, which imports the datamodules, re-exports them)."""

# Keys that change *how* a run proceeds, not what it computes: left out of the config hash, and a
# resumed run may change them. Every other key defines the result.
HOW_KEYS = ("run_dir", "runs_root", "results", "cache_dir", "tag", "trainer.progress_bar", "trainer.log_every_n_steps",
            "trainer.checkpoint_every_n_steps", "data.num_workers", "data.pin_memory", "eval.cache_real_stats",
            "trainer.allocator", "trainer.parallel_stages", "trainer.encoding_cache")
# Where a method's diffusion configs (methods.vdm.DiffusionConfig) sit in the run config.
DIFFUSION_CONFIGS = ("method.diffusion", "method.image_prior.diffusion", "method.motion.diffusion")
# Where the methods' lean UNets (methods.nets.unet.UNetConfig) sit in the run config.
UNET_CONFIGS = ("method.unet", "method.image_prior.unet", "method.residual.unet")
# Keys added after results were stored, with their defaults: left out of the config hash while at their
# default, so the hashes of configs written before them (done sweep jobs, finished runs) stay what they were.
ABSENT_AT_DEFAULT = {"trainer.time_budget": None, "trainer.compile": False, "trainer.channels_last": False,
                     "trainer.attention": "auto", "optim.lr_decay": "none", "optim.lr_decay_start": 0.0,
                     "method.content.latent_repeats": None,
                     **{f"{at}.min_snr_gamma": 0.0 for at in DIFFUSION_CONFIGS},
                     **{f"{at}.snr_shift": 1.0 for at in DIFFUSION_CONFIGS},
                     **{f"{at}.temporal_attention": [] for at in UNET_CONFIGS}}
