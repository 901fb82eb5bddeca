defmodule Mambex.MisuseTest do
  @moduledoc """
  Garbage of every kind, in every argument position of every public function
  and of every Mambex.NIF function, must raise ArgumentError (never another
  exception, never a crash), and the VM and the library keep working after.

  Each test collects every call that did not raise ArgumentError and fails
  listing them all, so one run shows every offending argument.
  """
  use ExUnit.Case, async: true

  import Mambex.TestHelpers
  alias Mambex.{NIF, Ops, Tensor}

  # ---- garbage by argument kind -------------------------------------------

  defp freed do
    t = Tensor.iota({2, 5})
    :ok = Tensor.free(t)
    t
  end

  defp rank9, do: {1, 1, 1, 1, 1, 1, 1, 1, 1}

  # every kind of term; positions remove the ones they accept
  defp base do
    [
      :foo,
      nil,
      true,
      -1,
      2 ** 70,
      -(2 ** 70),
      2 ** 64,
      1.5,
      -0.0,
      "garbage",
      <<0, 1, 2>>,
      <<1::3>>,
      %{},
      %{ref: make_ref()},
      %{a: 1},
      [],
      [1, 2],
      [a: 1],
      self(),
      make_ref(),
      {},
      {1, 2, 3},
      {:cuda, :x},
      {:f},
      fn -> :ok end,
      rank9()
    ]
  end

  defp fake_tensor, do: %Tensor{ref: make_ref(), shape: {2, 5}, type: {:f, 32}, device: :cpu}

  defp garbage(:tensor), do: garbage(:live_or_freed_tensor) ++ [freed()]
  # free/1 and live?/1 accept freed tensors
  defp garbage(:live_or_freed_tensor), do: base() ++ [fake_tensor(), %{ref: :foo}, {:cuda, 99}]
  # the struct accessors only read the struct
  defp garbage(:non_struct), do: base()

  # binary-op operands: numbers are scalars, so only non-number garbage
  defp garbage(:operand), do: garbage(:tensor) -- [-1, 1.5, -0.0]

  defp garbage(:shape) do
    (base() -- [{}, {1, 2, 3}]) ++
      [{-1}, {1.5}, {:a}, {2 ** 70}, {2 ** 63}, {1, -1}, {2 ** 62}, {nil, 2}, [2, 5]]
  end

  defp garbage(:type) do
    base() ++
      [
        {:f, 8},
        {:f, 32.0},
        {:g, 32},
        {:u, 16},
        {:s, 2 ** 70},
        {:f, 32, 1},
        "f32",
        :f32,
        {:bf, 32},
        {"f", 32},
        [:f, 32]
      ]
  end

  defp garbage(:device) do
    base() ++
      [
        {:cuda, 99},
        {:cuda, -1},
        {:cuda},
        {:gpu, 0},
        :gpu,
        {:cuda, 2 ** 70},
        "cpu",
        {:cuda, 0, 1},
        {:cuda, 1.0},
        {:cpu},
        :CPU
      ]
  end

  defp garbage(:number), do: base() -- [-1, 1.5, -0.0]

  # an axis where nil means "all" (reductions, iota)
  defp garbage(:axis), do: (base() -- [-1, nil]) ++ [99, -99, 2, -3, 2 ** 31, 1.0]

  # an axis that must be an integer (slice, concatenate)
  defp garbage(:int_axis), do: (base() -- [-1]) ++ [99, -99, 2, -3, 1.0]

  defp garbage(:index), do: base() ++ [99, 11, 1.0, -(2 ** 63)]

  defp garbage(:seed), do: base() ++ [1.0, -(2 ** 63)]

  defp garbage(:perm) do
    (base() -- [nil]) ++ [{0, 0}, {0, 2}, {0, -1}, {1, 0, 2}, {1.0, 0}, [0, 0], [1, :x], {1}]
  end

  defp garbage(:tensor_list) do
    t = Tensor.iota({2, 5})

    base() ++
      [
        [freed()],
        [t, :foo],
        [t, freed()],
        [t | :improper],
        [Tensor.iota({})],
        [t, Tensor.iota({2, 5}, type: {:f, 64})],
        [t, Tensor.iota({3, 4})],
        [t, Tensor.iota({2, 5, 1})],
        List.duplicate(t, 1025),
        [fake_tensor()]
      ]
  end

  defp garbage(:event), do: base() ++ [t(), make_ref()]
  defp garbage(:limit), do: base()
  # counts beyond the tensor are valid (they return the whole tensor)
  defp garbage(:count), do: Enum.reject(base(), &(is_integer(&1) and &1 >= 0))
  defp garbage(:unary_op), do: base() ++ [:add, :sum, :Negate, "exp"]
  defp garbage(:binary_op), do: base() ++ [:negate, :sum, :sub, :Add, "add"]
  defp garbage(:reduce_op), do: base() ++ [:add, :min, :exp, "sum"]
  defp garbage(:dist), do: base() ++ [:gaussian, "uniform", :Uniform]
  defp garbage(:data), do: base() ++ [<<0::8*41>>, <<0::8*39>>]

  # keyword options: not a list, or a list with one garbage value
  defp garbage({:opts, valid, keys}) do
    not_lists = [
      :foo,
      "garbage",
      %{},
      %{type: {:f, 32}},
      1.5,
      self(),
      {:type, {:f, 32}},
      make_ref()
    ]

    with_bad_values = for {key, kind} <- keys, g <- garbage(kind), do: Keyword.put(valid, key, g)

    not_lists ++ with_bad_values
  end

  # ---- the checker ----------------------------------------------------------

  # Calls fun with args, then with each position replaced by each garbage
  # value of its kind; returns the calls that did not raise ArgumentError.
  defp misuse(fun, valid, kinds, label) do
    # the valid call itself must work, or the garbage calls prove nothing
    outcome = arg_error_outcome(fn -> apply(fun, valid) end)
    assert match?({:returned, _}, outcome), "#{label} with valid args: #{inspect(outcome)}"

    # one line per (argument position, kind of outcome), with examples
    for {kind, i} <- Enum.with_index(kinds),
        kind != :ok,
        g <- garbage(kind),
        args = List.replace_at(valid, i, g),
        outcome = arg_error_outcome(fn -> apply(fun, args) end),
        outcome != nil do
      {i, outcome_class(outcome), g}
    end
    |> Enum.group_by(fn {i, class, _} -> {i, class} end, fn {_, _, g} -> g end)
    |> Enum.map(fn {{i, class}, gs} ->
      "#{label} argument #{i + 1}: #{length(gs)} garbage values #{class}, e.g. " <>
        (gs |> Enum.take(4) |> Enum.map_join(", ", &short_inspect/1))
    end)
  end

  defp outcome_class({:returned, _}), do: "returned normally"
  defp outcome_class({:raised, mod, _}), do: "raised #{inspect(mod)}"
  defp outcome_class({:caught, kind, _}), do: "threw (#{kind})"

  defp short_inspect(%Tensor{} = t),
    do: "%Mambex.Tensor{shape: #{inspect(t.shape)}, live?: #{safe_live?(t)}}"

  defp short_inspect(term), do: inspect(term, limit: 4, printable_limit: 40)

  defp safe_live?(t) do
    Tensor.live?(t)
  rescue
    ArgumentError -> :not_a_resource
  end

  defp assert_all_raise(cases) do
    failures =
      Enum.flat_map(cases, fn {label, fun, valid, kinds} -> misuse(fun, valid, kinds, label) end)

    assert failures == [],
           "#{length(failures)} argument positions let garbage through without ArgumentError:\n" <>
             Enum.join(failures, "\n")

    # the VM and the library survived
    assert Tensor.to_binary(Ops.add(Tensor.iota({3}, type: {:s, 32}), 1)) ==
             encode([1, 2, 3], {:s, 32})
  end

  defp t, do: Tensor.iota({2, 5})
  defp t64, do: Tensor.iota({2, 5}, type: {:f, 64})
  defp bin10, do: encode(Enum.to_list(0..9), {:f, 32})

  # ---- Mambex.NIF, every function with its arity ----------------------------

  test "Mambex.NIF functions reject garbage in every position" do
    assert %{cuda_devices: n, cuda_status: s} = NIF.backend_info()
    assert is_integer(n) and is_binary(s)

    assert_all_raise([
      {"NIF.device_name", &NIF.device_name/1, [:cpu], [:device]},
      {"NIF.sync", &NIF.sync/1, [:cpu], [:device]},
      {"NIF.memory_stats", &NIF.memory_stats/1, [:cpu], [:device]},
      {"NIF.reset_peak", &NIF.reset_peak/1, [:cpu], [:device]},
      {"NIF.from_binary", &NIF.from_binary/4, [bin10(), {:f, 32}, {2, 5}, :cpu],
       [:data, :type, :shape, :device]},
      {"NIF.to_binary", &NIF.to_binary/2, [t(), 40], [:tensor, :limit]},
      {"NIF.to_device", &NIF.to_device/2, [t(), :cpu], [:tensor, :device]},
      {"NIF.free", &NIF.free/1, [t()], [:live_or_freed_tensor]},
      {"NIF.live?", &NIF.live?/1, [t()], [:live_or_freed_tensor]},
      {"NIF.fill", &NIF.fill/4, [{2, 5}, {:f, 32}, :cpu, 1.0], [:shape, :type, :device, :number]},
      {"NIF.iota", &NIF.iota/4, [{2, 5}, {:f, 32}, :cpu, nil], [:shape, :type, :device, :axis]},
      {"NIF.random", &NIF.random/7, [{2, 5}, {:f, 32}, :cpu, 1, :uniform, 0.0, 1.0],
       [:shape, :type, :device, :seed, :dist, :number, :number]},
      {"NIF.random(normal)", &NIF.random/7, [{2, 5}, {:f, 32}, :cpu, 1, :normal, 0.0, 1.0],
       [:ok, :ok, :ok, :ok, :ok, :number, :number]},
      {"NIF.reshape", &NIF.reshape/2, [t(), {5, 2}], [:tensor, :shape]},
      {"NIF.slice", &NIF.slice/4, [t(), 1, 1, 2], [:tensor, :int_axis, :index, :index]},
      {"NIF.concatenate", &NIF.concatenate/2, [[t(), t()], 0], [:tensor_list, :int_axis]},
      {"NIF.permute", &NIF.permute/2, [t(), {1, 0}], [:tensor, :perm]},
      {"NIF.cast", &NIF.cast/2, [t(), {:f, 64}], [:tensor, :type]},
      {"NIF.unary", &NIF.unary/2, [:exp, t()], [:unary_op, :tensor]},
      {"NIF.binary", &NIF.binary/3, [:add, t(), t()], [:binary_op, :operand, :operand]},
      {"NIF.binary(scalar)", &NIF.binary/3, [:divide, 2.0, t()], [:ok, :operand, :ok]},
      {"NIF.axpy", &NIF.axpy/3, [2.0, t(), t()], [:number, :tensor, :tensor]},
      {"NIF.reduce", &NIF.reduce/3, [:sum, t(), nil], [:reduce_op, :tensor, :axis]},
      {"NIF.event_record", &NIF.event_record/1, [:cpu], [:device]},
      {"NIF.event_elapsed", &NIF.event_elapsed/2, [NIF.event_record(:cpu), NIF.event_record(:cpu)],
       [:event, :event]},
      {"NIF.spin", &NIF.spin/2, [:cpu, 1.0], [:device, :number]}
    ])
  end

  test "NIF functions called with the wrong arity are undefined, not crashes" do
    assert_raise UndefinedFunctionError, fn -> apply(NIF, :fill, [{2}, {:f, 32}, :cpu]) end
    assert_raise UndefinedFunctionError, fn -> apply(NIF, :binary, [:add, 1]) end
  end

  # ---- Mambex ---------------------------------------------------------------

  test "Mambex device functions reject garbage devices" do
    assert_all_raise([
      {"Mambex.device_name", &Mambex.device_name/1, [:cpu], [:device]},
      {"Mambex.sync", &Mambex.sync/1, [:cpu], [:device]},
      {"Mambex.memory_stats", &Mambex.memory_stats/1, [:cpu], [:device]},
      {"Mambex.reset_peak", &Mambex.reset_peak/1, [:cpu], [:device]}
    ])
  end

  # ---- Mambex.Tensor ----------------------------------------------------------

  test "Tensor transfer functions reject garbage" do
    assert_all_raise([
      {"Tensor.from_binary/2", &Tensor.from_binary/2, [bin10(), {:f, 32}], [:data, :type]},
      {"Tensor.from_binary/3", &Tensor.from_binary/3, [bin10(), {:f, 32}, [shape: {2, 5}]],
       [:data, :type, {:opts, [shape: {2, 5}], shape: :shape, device: :device}]},
      {"Tensor.to_binary/1", &Tensor.to_binary/1, [t()], [:tensor]},
      {"Tensor.to_flat_list/1", &Tensor.to_flat_list/1, [t()], [:tensor]},
      {"Tensor.to_device/2", &Tensor.to_device/2, [t(), :cpu], [:tensor, :device]},
      {"Tensor.free/1", &Tensor.free/1, [t()], [:live_or_freed_tensor]},
      {"Tensor.live?/1", &Tensor.live?/1, [t()], [:live_or_freed_tensor]}
    ])
  end

  test "Tensor.to_binary/2 rejects garbage tensors and counts" do
    assert_all_raise([
      {"Tensor.to_binary/2", &Tensor.to_binary/2, [t(), 3], [:tensor, :count]}
    ])
  end

  test "Tensor creation functions reject garbage" do
    opts = fn valid, keys -> {:opts, valid, keys} end
    td = [type: :type, device: :device]

    assert_all_raise([
      {"Tensor.fill/2", &Tensor.fill/2, [{2, 5}, 1.5], [:shape, :number]},
      {"Tensor.fill/3", &Tensor.fill/3, [{2, 5}, 1.5, [type: {:f, 64}]],
       [:shape, :number, opts.([], td)]},
      {"Tensor.zeros/1", &Tensor.zeros/1, [{2, 5}], [:shape]},
      {"Tensor.zeros/2", &Tensor.zeros/2, [{2, 5}, []], [:shape, opts.([], td)]},
      {"Tensor.ones/1", &Tensor.ones/1, [{2, 5}], [:shape]},
      {"Tensor.ones/2", &Tensor.ones/2, [{2, 5}, []], [:shape, opts.([], td)]},
      {"Tensor.iota/1", &Tensor.iota/1, [{2, 5}], [:shape]},
      {"Tensor.iota/2", &Tensor.iota/2, [{2, 5}, [axis: 1]],
       [:shape, opts.([axis: 1], [axis: :axis] ++ td)]},
      {"Tensor.random_uniform/2", &Tensor.random_uniform/2, [{2, 5}, [seed: 1]],
       [:shape, opts.([seed: 1], [seed: :seed, min: :number, max: :number] ++ td)]},
      {"Tensor.random_normal/2", &Tensor.random_normal/2, [{2, 5}, [seed: 1]],
       [:shape, opts.([seed: 1], [seed: :seed, mean: :number, std: :number] ++ td)]}
    ])
  end

  test "random_* without a :seed raises ArgumentError" do
    assert_raise ArgumentError, fn -> Tensor.random_uniform({2}, []) end
    assert_raise ArgumentError, fn -> Tensor.random_normal({2}, type: {:f, 32}) end
  end

  test "Tensor views and copies reject garbage" do
    assert_all_raise([
      {"Tensor.reshape/2", &Tensor.reshape/2, [t(), {5, 2}], [:tensor, :shape]},
      {"Tensor.slice/4", &Tensor.slice/4, [t(), 1, 1, 2], [:tensor, :int_axis, :index, :index]},
      {"Tensor.concatenate/1", &Tensor.concatenate/1, [[t(), t()]], [:tensor_list]},
      {"Tensor.concatenate/2", &Tensor.concatenate/2, [[t(), t()], 1], [:tensor_list, :int_axis]},
      {"Tensor.transpose/1", &Tensor.transpose/1, [t()], [:tensor]},
      {"Tensor.transpose/2", &Tensor.transpose/2, [t(), {1, 0}], [:tensor, :perm]}
    ])
  end

  test "Tensor struct accessors reject non-tensors with ArgumentError" do
    assert_all_raise(
      for f <- [:shape, :type, :device, :rank, :size, :byte_size_of] do
        {"Tensor.#{f}/1", Function.capture(Tensor, f, 1), [t()], [:non_struct]}
      end
    )
  end

  # ---- Mambex.Ops ---------------------------------------------------------------

  test "binary ops reject garbage operands" do
    assert_all_raise(
      for op <- [:add, :subtract, :multiply, :divide, :maximum, :minimum],
          valid <- [[t(), t()], [t(), 2.0], [3, t()]] do
        {"Ops.#{op}", Function.capture(Ops, op, 2), valid,
         Enum.map(valid, &if(is_number(&1), do: :ok, else: :operand))}
      end
    )
  end

  test "unary ops, axpy, cast and reductions reject garbage" do
    assert_all_raise(
      (for op <- [:negate, :exp, :log, :sqrt] do
         {"Ops.#{op}", Function.capture(Ops, op, 1), [t()], [:tensor]}
       end ++
         [
           {"Ops.axpy", &Ops.axpy/3, [2.0, t(), t()], [:number, :tensor, :tensor]},
           {"Ops.cast", &Ops.cast/2, [t(), {:bf, 16}], [:tensor, :type]}
         ] ++
         for op <- [:sum, :mean, :max] do
           [
             {"Ops.#{op}/1", Function.capture(Ops, op, 1), [t()], [:tensor]},
             {"Ops.#{op}/2", Function.capture(Ops, op, 2), [t(), [axis: -1]],
              [:tensor, {:opts, [axis: -1], axis: :axis}]}
           ]
         end)
      |> List.flatten()
    )
  end

  # ---- specific misuse, with messages -------------------------------------------

  test "an absent CUDA device raises ArgumentError saying it is unavailable" do
    dev = {:cuda, 99}
    # (%T in the NIF prints Erlang syntax, {cuda,99}; Elixir's would be {:cuda, 99})
    msg = ~r/^[a-z_]+: device \{:?cuda, ?99\} is not available/

    for fun <- [
          fn -> Tensor.fill({2}, 1.0, device: dev) end,
          fn -> Tensor.zeros({2}, device: dev) end,
          fn -> Tensor.ones({2}, device: dev) end,
          fn -> Tensor.iota({2}, device: dev) end,
          fn -> Tensor.random_uniform({2}, seed: 1, device: dev) end,
          fn -> Tensor.random_normal({2}, seed: 1, device: dev) end,
          fn -> Tensor.from_binary(<<0::32>>, {:f, 32}, device: dev) end,
          fn -> Tensor.to_device(t(), dev) end,
          fn -> Mambex.device_name(dev) end,
          fn -> Mambex.sync(dev) end,
          fn -> Mambex.memory_stats(dev) end,
          fn -> Mambex.reset_peak(dev) end
        ] do
      assert_raise ArgumentError, msg, fun
    end
  end

  test "messages name the op and the argument" do
    assert_raise ArgumentError,
                 ~r/^from_binary: data has 3 bytes but shape \{1\} of type \{:?f, ?32\} needs 4/,
                 fn ->
                   Tensor.from_binary(<<1, 2, 3>>, {:f, 32}, shape: {1})
                 end

    assert_raise ArgumentError, ~r/^fill: value must be a float or a 64-bit integer, got: :?foo/, fn ->
      Tensor.fill({2}, :foo)
    end

    assert_raise ArgumentError, ~r/^fill: shape must be a tuple of at most 8/, fn ->
      Tensor.fill({1, 1, 1, 1, 1, 1, 1, 1, 1}, 0)
    end

    assert_raise ArgumentError, ~r/^add: b must be a Mambex.Tensor, a float or a 64-bit integer, got: :?foo/, fn ->
      Ops.add(t(), :foo)
    end

    assert_raise ArgumentError, ~r/^subtract: a was freed/, fn -> Ops.subtract(freed(), 1) end

    assert_raise ArgumentError,
                 ~r/^multiply: a and b must have the same type, got \{:?f, ?32\} and \{:?f, ?64\}/,
                 fn ->
                   Ops.multiply(t(), t64())
                 end

    assert_raise ArgumentError, ~r/^divide: shapes \{2, ?5\} and \{2\} do not broadcast/, fn ->
      Ops.divide(t(), Tensor.iota({2}))
    end

    assert_raise ArgumentError,
                 ~r/^slice: start 4 and length 2 must lie within axis 0 of size 2/,
                 fn ->
                   Tensor.slice(t(), 0, 4, 2)
                 end

    assert_raise ArgumentError,
                 ~r/^reshape: shape \{3\} has 3 elements but the tensor has 10/,
                 fn ->
                   Tensor.reshape(t(), {3})
                 end

    assert_raise ArgumentError, ~r/^permute: axes must be a tuple permuting 0..1/, fn ->
      Tensor.transpose(t(), {0, 0})
    end

    assert_raise ArgumentError, ~r/^exp: .*float/, fn ->
      Ops.exp(Tensor.iota({2}, type: {:s, 32}))
    end

    assert_raise ArgumentError, ~r/^mean: mean needs a float tensor/, fn ->
      Ops.mean(Tensor.iota({2}, type: {:u, 8}))
    end

    assert_raise ArgumentError,
                 ~r/^sum: axis must be nil or an integer axis of a rank-2 tensor, got: 2/,
                 fn ->
                   Ops.sum(t(), axis: 2)
                 end

    assert_raise ArgumentError, ~r/^axpy: x and y must have the same shape/, fn ->
      Ops.axpy(1.0, t(), Tensor.iota({10}))
    end

    assert_raise ArgumentError, ~r/^concatenate: all tensors must have the same type/, fn ->
      Tensor.concatenate([t(), t64()])
    end

    assert_raise ArgumentError, ~r/^random: standard deviation must be >= 0/, fn ->
      Tensor.random_normal({2}, seed: 1, std: -1.0)
    end

    assert_raise ArgumentError, ~r/^random: min must not exceed max/, fn ->
      Tensor.random_uniform({2}, seed: 1, min: 2, max: 1)
    end

    assert_raise ArgumentError, ~r/^random: normal samples need a float type/, fn ->
      Tensor.random_normal({2}, seed: 1, type: {:s, 32})
    end

    assert_raise ArgumentError, ~r/^to_binary: tensor was freed/, fn ->
      Tensor.to_binary(freed())
    end

    assert_raise ArgumentError, ~r/^cast: type must be/, fn -> Ops.cast(t(), {:f, 8}) end

    assert_raise ArgumentError, ~r/options must be a keyword list/, fn ->
      Tensor.fill({2}, 1, :foo)
    end

    assert_raise ArgumentError, ~r/options must be a keyword list/, fn -> Ops.sum(t(), :foo) end
  end

  test "mismatched types, shapes and ranks are rejected by every multi-tensor op" do
    a = t()

    cases = [
      fn -> Ops.add(a, t64()) end,
      fn -> Ops.maximum(t64(), a) end,
      fn -> Ops.add(a, Tensor.iota({5, 2})) end,
      fn -> Ops.add(Tensor.iota({3}), Tensor.iota({2, 5})) end,
      fn -> Ops.add(a, Tensor.iota({1, 2, 5, 1})) end,
      fn -> Ops.axpy(1.0, a, t64()) end,
      fn -> Ops.axpy(1.0, a, Tensor.iota({5, 2})) end,
      fn -> Ops.axpy(1.0, a, Tensor.iota({5})) end,
      fn -> Ops.axpy(1.0, Tensor.iota({}), Tensor.iota({1})) end,
      fn -> Tensor.concatenate([a, t64()], 0) end,
      fn -> Tensor.concatenate([a, Tensor.iota({3, 4})], 0) end,
      fn -> Tensor.concatenate([a, Tensor.iota({2, 5, 1})], 0) end,
      fn -> Tensor.concatenate([Tensor.iota({}), Tensor.iota({})], 0) end,
      fn -> Tensor.concatenate([], 0) end,
      fn -> Tensor.slice(Tensor.iota({}), 0, 0, 1) end,
      fn -> Tensor.iota({}, axis: 0) end,
      fn -> Tensor.iota({3}, axis: -2) end,
      fn -> Ops.log(Tensor.iota({2}, type: {:u, 8})) end,
      fn -> Ops.sqrt(Tensor.iota({2}, type: {:s, 64})) end,
      fn -> Ops.sum(Tensor.iota({}), axis: 0) end,
      fn -> Ops.max(Tensor.zeros({0})) end,
      fn -> Tensor.from_binary(<<0::8*5>>, {:f, 32}, shape: {1}) end,
      fn -> Tensor.from_binary(<<>>, {:f, 32}, shape: {1}) end,
      fn -> Tensor.from_binary(<<0::64>>, {:f, 32}, shape: {3}) end,
      fn -> Tensor.from_binary(<<0::64>>, {:f, 64}, shape: {2}) end,
      fn -> Tensor.from_binary(<<0::24>>, {:f, 16}) end,
      fn -> Tensor.fill({2 ** 62}, 0.0) end,
      fn -> Tensor.fill({2 ** 31, 2 ** 31, 2 ** 31}, 0.0) end
    ]

    failures =
      for {fun, i} <- Enum.with_index(cases), o = arg_error_outcome(fun), o != nil, do: {i, o}

    assert failures == []
  end

  test "concatenating huge zero-sized tensors does not wrap the axis length around" do
    # {0, 2^62} holds no element; four of them along axis 1 would be 2^64 long
    parts = List.duplicate(Tensor.zeros({0, 2 ** 62}), 4)

    case arg_error_outcome(fn -> Tensor.concatenate(parts, 1) end) do
      nil -> :ok
      {:returned, out} -> flunk("returned a tensor of shape #{inspect(out.shape)}")
      other -> flunk("#{inspect(other)}")
    end
  end

  test "every op on a freed tensor raises ArgumentError, and the others keep working" do
    x = t()
    f = freed()

    for fun <- [
          fn -> Ops.add(x, f) end,
          fn -> Ops.add(f, x) end,
          fn -> Ops.axpy(1.0, x, f) end,
          fn -> Ops.axpy(1.0, f, x) end,
          fn -> Tensor.concatenate([x, f, x]) end,
          fn -> Tensor.to_device(f, :cpu) end,
          fn -> Tensor.transpose(f) end,
          fn -> Ops.cast(f, {:f, 64}) end,
          fn -> Ops.sum(f, axis: 0) end,
          fn -> Tensor.slice(f, 0, 0, 1) end,
          fn -> inspect(Tensor.reshape(f, {10})) end
        ] do
      assert_raise ArgumentError, ~r/freed/, fun
    end

    assert Tensor.to_binary(Ops.add(x, x)) == encode(Enum.map(0..9, &(2.0 * &1)), {:f, 32})
  end

  @tag :cuda
  test "tensors on different devices are rejected" do
    dev = cuda_device()
    c = Tensor.iota({2, 5}, device: dev)
    c64 = Tensor.iota({2, 5}, device: dev, type: {:f, 64})

    if dev != :cpu do
      assert_raise ArgumentError, ~r/same device/, fn -> Ops.add(t(), c) end
      assert_raise ArgumentError, ~r/same device/, fn -> Ops.subtract(c, Tensor.iota({5})) end
      assert_raise ArgumentError, ~r/same device/, fn -> Ops.axpy(1.0, c, t()) end
      assert_raise ArgumentError, ~r/same device/, fn -> Tensor.concatenate([t(), c]) end
    end

    assert_raise ArgumentError, fn -> Ops.add(c, c64) end
    # the device keeps working
    assert read(Ops.add(c, 1.0)) == Enum.map(1..10, &(&1 * 1.0))
  end
end
