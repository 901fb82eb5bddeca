# Benchmarks run as ExUnit tests: `MAMBEX_BENCH=1 mix test` (all) or
# `MAMBEX_BENCH=1 mix test bench/foundation_bench_test.exs`. Results are
# appended to bench/results/*.csv (override the folder with MAMBEX_RESULTS).
# GPU benchmarks are tagged :cuda and skipped when no GPU answers.
exclude = if Mambex.cuda_available?(), do: [], else: [:cuda]
IO.puts("Mambex benchmarks: CUDA #{Mambex.cuda_status()}; commit #{Mambex.Bench.commit()}")
ExUnit.start(exclude: exclude, timeout: 600_000, seed: 0, max_cases: 1)

defmodule BenchHelper do
  @moduledoc false
  def results_dir, do: System.get_env("MAMBEX_RESULTS", Path.expand("results", __DIR__))

  def report(file, rows) do
    Mambex.Bench.write_csv(Path.join(results_dir(), file), rows)

    for r <- rows do
      extra = if Map.has_key?(r, :metric), do: "  #{r.metric}=#{fmt(r.value)}", else: ""

      IO.puts(
        String.pad_trailing("#{r.op} #{r.shapes} #{r.dtype} #{inspect(r.device)}", 60) <>
          " median #{fmt(r.stats.median)} us  p10 #{fmt(r.stats.p10)}  p90 #{fmt(r.stats.p90)}" <> extra
      )
    end
  end

  def fmt(x) when is_float(x), do: :erlang.float_to_binary(x, decimals: 2)
  def fmt(x), do: to_string(x)
end
