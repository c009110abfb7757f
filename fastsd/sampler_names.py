"""The names of fastsd's samplers, without their arithmetic: the CLI's help lists them
without importing torch. fastsd/schedulers.py defines each sampler under one of these names
and refuses to import if the two differ."""

SAMPLER_NAMES = ("ddim", "pndm", "euler", "euler_a", "euler_karras", "heun", "dpmpp_2m", "dpmpp_2m_karras",
                 "dpmpp_2m_sde", "dpmpp_2m_sde_karras", "unipc", "lcm")
