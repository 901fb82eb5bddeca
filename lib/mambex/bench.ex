defmodule Mambex.Bench do
  @moduledoc """
  Timing helpers for benchmarks.

  `device_time/3` times a function with events recorded on the device's queue
  before and after it (CUDA events on a GPU, so the figure is the device time
  of the work the function enqueued); `wall_time/2` times it with the host
  clock, including a final `Mambex.sync/1`. Both run warm-up calls first and
  report the median and the 10th/90th percentiles in microseconds.
  The outputs a timed function returns (tensors, or lists and tuples of them)
  are freed after each run. `write_csv/2` appends result rows to a CSV file in `bench/results/`.
  """

  @type stats :: %{median: float(), p10: float(), p90: float(), p99: float(), runs: pos_integer()}

  @doc """
  Device time of `fun` on `device`: `:warmup` (default 5) untimed calls, then
  `:runs` (default 50) calls each between two events. On a GPU, a kernel
  spinning `:pad_us` microseconds (default 300) is enqueued before each
  start event, so that the host's enqueueing overlaps it and the events
  measure the device's time for the work alone (`pad_us: 0` measures host
  enqueue and device time together, as a stream would see them from idle).
  """
  @spec device_time(Mambex.device(), (-> any()), keyword()) :: stats()
  def device_time(device, fun, opts \\ []) do
    warmup = Keyword.get(opts, :warmup, 5)
    runs = Keyword.get(opts, :runs, 50)
    for _ <- 1..warmup//1, do: release(fun.())
    Mambex.sync(device)

    pad = Keyword.get(opts, :pad_us, 300)

    samples =
      for _ <- 1..runs do
        # the device works through `pad` µs of spinning while the host
        # enqueues the timed work: the events then bracket device time only
        if device != :cpu and pad > 0, do: Mambex.NIF.spin(device, pad)
        a = Mambex.NIF.event_record(device)
        result = fun.()
        b = Mambex.NIF.event_record(device)
        us = Mambex.NIF.event_elapsed(a, b)
        release(result)
        us
      end

    stats(samples)
  end

  @doc """
  Host wall-clock time of `fun` followed by `Mambex.sync(device)`, in
  microseconds; options as `device_time/3`.
  """
  @spec wall_time(Mambex.device(), (-> any()), keyword()) :: stats()
  def wall_time(device, fun, opts \\ []) do
    warmup = Keyword.get(opts, :warmup, 5)
    runs = Keyword.get(opts, :runs, 50)
    for _ <- 1..warmup//1, do: release(fun.())
    Mambex.sync(device)

    samples =
      for _ <- 1..runs do
        t0 = System.monotonic_time(:nanosecond)
        result = fun.()
        Mambex.sync(device)
        us = (System.monotonic_time(:nanosecond) - t0) / 1000
        release(result)
        us
      end

    stats(samples)
  end

  # Outputs are freed after each timed run, so that garbage the process has
  # not collected yet does not pile up in device or host memory.
  defp release(%Mambex.Tensor{} = t), do: Mambex.Tensor.free(t)
  defp release(list) when is_list(list), do: Enum.each(list, &release/1)
  defp release(tuple) when is_tuple(tuple), do: tuple |> Tuple.to_list() |> release()
  defp release(_), do: :ok

  @doc "Median, 10th, 90th and 99th percentiles of a list of samples."
  @spec stats([number()]) :: stats()
  def stats(samples) do
    sorted = Enum.sort(samples)
    n = length(sorted)
    pick = fn q -> Enum.at(sorted, min(n - 1, round(q * (n - 1)))) end

    %{median: median(sorted), p10: pick.(0.1), p90: pick.(0.9), p99: pick.(0.99), runs: n}
  end

  defp median(sorted) do
    n = length(sorted)
    if rem(n, 2) == 1, do: Enum.at(sorted, div(n, 2)),
      else: (Enum.at(sorted, div(n, 2) - 1) + Enum.at(sorted, div(n, 2))) / 2
  end

  @header ~w(op shapes dtype device device_name median_us p10_us p90_us metric value commit date)

  @doc """
  Appends rows to a CSV file (writing the header when the file is new). Each
  row is a map with `:op`, `:shapes`, `:dtype`, `:device`, `:stats`, and
  optionally `:metric` and `:value` (e.g. "GB/s", 3900.0).
  """
  @spec write_csv(Path.t(), [map()]) :: :ok
  def write_csv(path, rows) do
    File.mkdir_p!(Path.dirname(path))
    new? = not File.exists?(path)
    commit = commit()
    date = Date.utc_today() |> Date.to_iso8601()

    lines =
      for row <- rows do
        s = row.stats

        [
          row.op,
          row.shapes,
          row.dtype,
          inspect(row.device),
          Mambex.device_name(row.device),
          fmt(s.median),
          fmt(s.p10),
          fmt(s.p90),
          Map.get(row, :metric, ""),
          fmt(Map.get(row, :value, "")),
          commit,
          date
        ]
        |> Enum.map_join(",", &csv_field/1)
      end

    header = if new?, do: [Enum.join(@header, ","), "\n"], else: []
    File.write!(path, [header, Enum.map(lines, &[&1, "\n"])], [:append])
  end

  defp fmt(x) when is_float(x), do: :erlang.float_to_binary(x, decimals: 3)
  defp fmt(x), do: to_string(x)

  defp csv_field(s) do
    s = to_string(s)
    if String.contains?(s, [",", "\"", "\n"]), do: "\"" <> String.replace(s, "\"", "\"\"") <> "\"", else: s
  end

  @doc "The commit being measured: $MAMBEX_COMMIT, else `git rev-parse`, else \"unknown\"."
  @spec commit() :: String.t()
  def commit do
    case System.get_env("MAMBEX_COMMIT") do
      nil ->
        case System.cmd("git", ["rev-parse", "--short", "HEAD"], stderr_to_stdout: true) do
          {sha, 0} -> String.trim(sha)
          _ -> "unknown"
        end

      sha ->
        sha
    end
  rescue
    _ -> "unknown"
  end
end
