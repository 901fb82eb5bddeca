defmodule Mix.Tasks.Compile.MambexNative do
  @moduledoc """
  Builds the native objects (priv/mambex_nif.so and, when nvcc is present,
  priv/mambex_cuda.so) by running `make` with the ERTS include directory of
  the running VM. No hex dependency (no elixir_make) is needed.
  """
  use Mix.Task.Compiler

  @impl true
  def run(_args) do
    erts_include =
      Path.join([:code.root_dir(), "erts-#{:erlang.system_info(:version)}", "include"])

    erts_include =
      if File.exists?(Path.join(erts_include, "erl_nif.h")),
        do: erts_include,
        else: Path.join([:code.root_dir(), "usr", "include"])

    env = [
      {"ERTS_INCLUDE_DIR", erts_include},
      # make must not inherit the running VM's own launcher variables
      {"BINDIR", nil},
      {"ROOTDIR", nil},
      {"PROGNAME", nil},
      {"EMU", nil}
    ]

    jobs = "-j#{max(System.schedulers_online(), 2)}"

    case System.cmd("make", [jobs, "--no-print-directory", "all"],
           cd: __DIR__ |> Path.expand(),
           env: env,
           stderr_to_stdout: true,
           into: IO.stream(:stdio, :line)
         ) do
      {_, 0} ->
        :ok

      {_, status} ->
        Mix.raise("make failed with exit status #{status}")
    end
  end
end

defmodule Mambex.MixProject do
  use Mix.Project

  def project do
    [
      app: :mambex,
      version: "0.1.0",
      elixir: "~> 1.14",
      start_permanent: Mix.env() == :prod,
      compilers: [:mambex_native] ++ Mix.compilers(),
      deps: [],
      # `MAMBEX_BENCH=1 mix test` runs the benchmarks in bench/ instead of the tests.
      test_paths: if(System.get_env("MAMBEX_BENCH") in [nil, "", "0"], do: ["test"], else: ["bench"]),
      docs: [main: "readme"]
    ]
  end

  def application do
    [extra_applications: [:logger]]
  end
end
