# Test setup for Mambex.
#
#   MAMBEX_NVCC=0 mix test            CPU tests (CUDA tests run only where a GPU answers)
#   MAMBEX_SLOW=1 mix test            also the :slow tests
#   mix test --seed N                 replay the random inputs of a run (the seed is printed)
#   mix test --include cuda           force the :cuda tests (they fail without a GPU)
#   MAMBEX_TEST_CUDA_AS_CPU=1 mix test --include cuda
#                                     self-check of the suite: the tests written for
#                                     {:cuda, 0} run against :cpu instead
Code.require_file("support/helpers.exs", __DIR__)

exclude =
  if(Mambex.cuda_available?(), do: [], else: [:cuda]) ++
    if System.get_env("MAMBEX_SLOW") == "1", do: [], else: [:slow]

# ExUnit.configuration/0 invents a new time-based seed on every call until one
# is configured, so fix it once: every per-test input seed derives from it
# (Mambex.TestHelpers.seed_rand/1), and `mix test --seed N` replays a run.
seed = ExUnit.configuration()[:seed]
ExUnit.configure(seed: seed)

ExUnit.start(exclude: exclude)

IO.puts(
  "Mambex tests: input seed #{seed} (replay with `mix test --seed #{seed}`); " <>
    "CUDA: #{Mambex.cuda_status()}; excluded tags: #{inspect(exclude)}"
)
