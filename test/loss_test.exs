Code.require_file("support/loss_reference.exs", __DIR__)

defmodule Mambex.LossTestHelpers do
  @moduledoc false
  # Inputs and checks for the loss tests: random inputs from the test's seed
  # (Mambex.TestHelpers.seed_rand, printed by test_helper.exs), compared with
  # the float64 reference of test/support/loss_reference.exs.

  import ExUnit.Assertions
  import Mambex.TestHelpers

  alias Mambex.{Loss, LossReference, Tensor}

  def param_type(device, io), do: if(device == :cpu, do: io, else: {:f, 32})

  @doc """
  A cross-entropy problem: leading shape `lead`, `c` classes. opts:
  :weights (true), :ignore_index (every third row gets it), :bad (targets
  out of range in rows 1 and 4 when present), :logits (a list to use),
  plus the loss options. Returns a map of the lists and the library options.
  """
  def xent_problem(lead, c, io, param, opts) do
    rows = numel(lead)
    xs = Keyword.get_lazy(opts, :logits, fn -> rand_values(rows * c, io) end)
    ignore = opts[:ignore_index]

    targets =
      for r <- 0..(rows - 1)//1 do
        cond do
          ignore != nil and rem(r, 3) == 2 -> ignore
          opts[:bad] && r == 1 -> c
          opts[:bad] && r == 4 -> -1
          true -> :rand.uniform(c) - 1
        end
      end

    weights = if opts[:weights], do: rand_values(c, param, positive: true), else: nil
    loss_opts = Keyword.take(opts, [:reduction, :scale, :ignore_index])
    %{lead: lead, c: c, xs: xs, targets: targets, weights: weights, loss_opts: loss_opts}
  end

  def run_xent(p, device, io, extra \\ []) do
    param = param_type(device, io)
    lt = make(p.xs, io, Tuple.append(p.lead, p.c), device)
    tt = make(p.targets, {:s, 32}, p.lead, device)
    w = if p.weights, do: [weights: make(p.weights, param, {p.c}, device)], else: []
    Loss.cross_entropy(lt, tt, p.loss_opts ++ w ++ extra)
  end

  def ref_xent(p) do
    rows = if p.xs == [], do: [], else: Enum.chunk_every(p.xs, p.c)
    opts = if p.weights, do: [weights: p.weights], else: []
    {loss, grad} = LossReference.cross_entropy(rows, p.targets, p.loss_opts ++ opts)
    {loss, List.flatten(grad)}
  end

  @doc "Runs a problem on a device and checks it against the reference."
  def check_xent(label, lead, c, opts, device, io, tol_loss, tol_grad) do
    param = param_type(device, io)
    p = xent_problem(lead, c, io, param, opts)
    {loss, dl} = run_xent(p, device, io)
    {rl, rg} = ref_xent(p)
    assert loss.shape == {} and loss.type == param and loss.device == device
    assert dl.shape == Tuple.append(lead, c) and dl.type == io
    [l] = read(loss)
    e = rel_err([l], [rl])
    assert e <= tol_loss, "#{label}: loss #{inspect(l)} vs #{inspect(rl)} (rel #{inspect(e)})"
    e = rel_err(read(dl), rg)
    assert e <= tol_grad, "#{label}: dlogits relative error #{inspect(e)}"
  end

  def check_mse(label, shape, opts, device, io, tol_loss, tol_grad) do
    param = param_type(device, io)
    n = numel(shape)
    ps = rand_values(n, io)
    ys = rand_values(n, io)
    {loss, dp} = Loss.mse(make(ps, io, shape, device), make(ys, io, shape, device), opts)
    {rl, rg} = LossReference.mse(ps, ys, opts)
    assert loss.shape == {} and loss.type == param and loss.device == device
    assert dp.shape == shape and dp.type == io
    [l] = read(loss)
    assert rel_err([l], [rl]) <= tol_loss, "#{label}: loss #{inspect(l)} vs #{inspect(rl)}"
    assert rel_err(read(dp), rg) <= tol_grad, "#{label}: dpred"
  end

  @doc "Rows of a flat list, with the NaN rows of `bad` apart."
  def split_rows(list, c, bad_rows) do
    list
    |> Enum.chunk_every(c)
    |> Enum.with_index()
    |> Enum.split_with(fn {_row, r} -> r in bad_rows end)
  end

  def bits(t), do: Tensor.to_binary(t)
end

defmodule Mambex.LossTest do
  use ExUnit.Case, async: true

  import Mambex.TestHelpers
  import Mambex.LossTestHelpers

  alias Mambex.{Loss, LossReference, Tensor}

  setup context, do: seed_rand(context)

  # {name, leading shape, classes, options}
  @xent_cases [
    {"1 row, 1 class", {1}, 1, []},
    {"odd rows, 2 classes", {5}, 2, []},
    {"7 classes, sum", {9}, 7, [reduction: :sum]},
    {"64 classes, weights", {33}, 64, [weights: true]},
    {"64 classes, ignore_index", {33}, 64, [ignore_index: -100]},
    {"leading {2, 3}, all options", {2, 3}, 9,
     [ignore_index: -100, weights: true, scale: 0.25]},
    {"rank-1 logits", {}, 11, [scale: 2.0]},
    {"1000 classes, scale", {3}, 1000, [scale: 3.0]},
    {"2049 classes, sum, weights", {2}, 2049, [reduction: :sum, weights: true]},
    {"5000 classes, weights, ignore", {4}, 5000, [weights: true, ignore_index: -100]}
  ]

  @mse_cases [
    {"one element", {1}, []},
    {"odd vector, sum", {7}, [reduction: :sum]},
    {"rank 0", {}, [scale: 0.5]},
    {"(3, 5, 4), scale", {3, 5, 4}, [scale: 3.0]},
    {"odd, many", {1031}, []}
  ]

  describe "cross-entropy on the CPU against the float64 reference" do
    for {name, lead, c, opts} <- @xent_cases do
      test "f32: #{name}" do
        check_xent(unquote(name), unquote(Macro.escape(lead)), unquote(c), unquote(opts), :cpu,
          {:f, 32}, 1.0e-5, 1.0e-4)
      end

      test "f64: #{name}" do
        check_xent(unquote(name), unquote(Macro.escape(lead)), unquote(c), unquote(opts), :cpu,
          {:f, 64}, 1.0e-12, 1.0e-12)
      end
    end

    test "a larger threaded call (300 x 257, all options)" do
      check_xent("threaded", {300}, 257, [weights: true, ignore_index: -1, scale: 0.5], :cpu,
        {:f, 32}, 1.0e-5, 1.0e-4)
    end
  end

  describe "MSE on the CPU against the float64 reference" do
    for {name, shape, opts} <- @mse_cases, io <- [{:f, 32}, {:f, 64}] do
      test "#{inspect(io)}: #{name}" do
        io = unquote(Macro.escape(io))
        tol = if io == {:f, 64}, do: 1.0e-12, else: 1.0e-5
        check_mse(unquote(name), unquote(Macro.escape(shape)), unquote(opts), :cpu, io, tol, tol)
      end
    end

    test "a larger threaded call (400 x 300, sum)" do
      check_mse("threaded", {400, 300}, [reduction: :sum], :cpu, {:f, 32}, 1.0e-5, 1.0e-5)
    end
  end

  describe "special cases (CPU and CUDA)" do
    for {label, dev, tags} <- device_matrix() do
      @tag tags
      test "#{label}: all rows ignored gives loss 0 and zero gradients" do
        dev = unquote(Macro.escape(dev))

        for red <- [:mean, :sum], c <- [3, 70, 1500], weights <- [false, true] do
          p = xent_problem({5}, c, {:f, 32}, {:f, 32}, weights: weights, reduction: red)
          p = %{p | targets: List.duplicate(7, 5), loss_opts: [reduction: red, ignore_index: 7]}
          {loss, dl} = run_xent(p, dev, {:f, 32})
          assert read(loss) == [0.0]
          assert Enum.all?(read(dl), &(&1 == 0.0))
        end
      end

      @tag tags
      test "#{label}: an ignore_index inside 0..C-1 ignores the rows of that class" do
        dev = unquote(Macro.escape(dev))
        p = xent_problem({8}, 5, {:f, 32}, {:f, 32}, weights: true)
        p = %{p | targets: [0, 1, 0, 2, 3, 0, 4, 1], loss_opts: [ignore_index: 0]}
        {loss, dl} = run_xent(p, dev, {:f, 32})
        {rl, rg} = ref_xent(p)
        assert rel_err(read(loss), [rl]) <= 1.0e-5
        assert rel_err(read(dl), rg) <= 1.0e-4
      end

      @tag tags
      test "#{label}: out-of-range targets give a NaN loss and NaN rows, never a crash" do
        dev = unquote(Macro.escape(dev))

        for c <- [1, 7, 64, 1500], opts <- [[], [weights: true], [reduction: :sum, ignore_index: -100]] do
          p = xent_problem({6}, c, {:f, 32}, {:f, 32}, [bad: true] ++ opts)
          # the extremes of s32 too
          targets = p.targets |> List.replace_at(1, 2_147_483_647) |> List.replace_at(4, -2_147_483_648)

          for p <- [p, %{p | targets: targets}] do
            {loss, dl} = run_xent(p, dev, {:f, 32})
            {rl, rg} = ref_xent(p)
            assert rl == :nan
            assert read(loss) == [:nan], "C = #{c} #{inspect(opts)}"
            {bad, good} = split_rows(read(dl), c, [1, 4])
            {_, ref_good} = split_rows(rg, c, [1, 4])
            assert Enum.all?(bad, fn {row, _} -> Enum.all?(row, &(&1 == :nan)) end)

            assert rel_err(
                     Enum.flat_map(good, &elem(&1, 0)),
                     Enum.flat_map(ref_good, &elem(&1, 0))
                   ) <= 1.0e-4
          end
        end
      end

      @tag tags
      test "#{label}: extreme logits (±1e4) stay finite and accurate" do
        dev = unquote(Macro.escape(dev))

        for c <- [2, 64, 1500] do
          xs =
            for i <- 1..(4 * c) do
              case rem(i, 5) do
                0 -> 1.0e4
                1 -> -1.0e4
                2 -> 1.0e4 - 3.0
                _ -> quantize(:rand.uniform() * 20.0 - 10.0, {:f, 32})
              end
            end

          p = xent_problem({4}, c, {:f, 32}, {:f, 32}, logits: xs)
          {loss, dl} = run_xent(p, dev, {:f, 32})
          {rl, rg} = ref_xent(p)
          [l] = read(loss)
          assert is_float(l)
          # the log-sum-exp is formed as log(Σ exp(x - max)), a sum near 1:
          # fp32 rounds it to about 1.2e-7 absolute, which is the whole loss when
          # every row's target logit dominates (C = 2 can give a loss of 5e-7)
          assert abs(l - rl) <= 1.0e-5 * abs(rl) + 2.4e-7, "C = #{c}: #{l} vs #{rl}"
          # the gradient softmax − onehot has the same absolute floor (divided
          # by the 4 rows of the mean) where it is that small
          g = read(dl)
          diff = :math.sqrt(Enum.zip_reduce(g, rg, 0.0, fn a, b, acc -> acc + (a - b) * (a - b) end))
          norm = :math.sqrt(Enum.reduce(rg, 0.0, fn b, acc -> acc + b * b end))
          assert diff <= 1.0e-4 * norm + 6.0e-8 * :math.sqrt(length(rg)), "C = #{c}: gradient"
        end
      end

      @tag tags
      test "#{label}: no rows, grad: false, and the loss is a device scalar" do
        dev = unquote(Macro.escape(dev))
        lt = Tensor.zeros({0, 5}, device: dev)
        tt = Tensor.zeros({0}, type: {:s, 32}, device: dev)

        for red <- [:mean, :sum] do
          {loss, dl} = Loss.cross_entropy(lt, tt, reduction: red)
          assert read(loss) == [0.0]
          assert dl.shape == {0, 5}
        end

        {loss, dp} = Loss.mse(Tensor.zeros({0}, device: dev), Tensor.zeros({0}, device: dev))
        assert read(loss) == [0.0] and dp.shape == {0}

        p = xent_problem({7}, 33, {:f, 32}, {:f, 32}, ignore_index: 3)
        {l1, d1} = run_xent(p, dev, {:f, 32})
        {l2, nil} = run_xent(p, dev, {:f, 32}, grad: false)
        assert %Tensor{shape: {}, type: {:f, 32}, device: ^dev} = l1
        assert bits(l1) == bits(l2) and d1.shape == {7, 33}

        pt = Tensor.random_uniform({3, 4}, seed: 1, device: dev)
        yt = Tensor.random_uniform({3, 4}, seed: 2, device: dev)
        {m1, _} = Loss.mse(pt, yt)
        {m2, nil} = Loss.mse(pt, yt, grad: false)
        assert bits(m1) == bits(m2)

        # chaining the scalar into further ops stays on the device
        sum = Mambex.Ops.add(l1, l2)
        assert sum.device == dev and sum.shape == {}
      end
    end
  end

  describe "finite differences (f64)" do
    test "cross-entropy: the CPU gradient and the reference gradient are the loss's derivative" do
      for opts <- [
            [],
            [reduction: :sum, scale: 0.7],
            [weights: true, ignore_index: -100],
            [weights: true, reduction: :sum]
          ] do
        p = xent_problem({5}, 4, {:f, 64}, {:f, 64}, opts)
        {_loss, dl} = run_xent(p, :cpu, {:f, 64})

        lib_loss = fn xs ->
          {l, nil} = run_xent(%{p | xs: xs}, :cpu, {:f, 64}, grad: false)
          hd(read(l))
        end

        fd = LossReference.finite_differences(lib_loss, p.xs)
        assert rel_err(read(dl), fd) <= 1.0e-7, inspect(opts)

        ref_loss = fn xs -> elem(ref_xent(%{p | xs: xs}), 0) end
        fd_ref = LossReference.finite_differences(ref_loss, p.xs)
        assert rel_err(elem(ref_xent(p), 1), fd_ref) <= 1.0e-7, inspect(opts)
      end
    end

    test "MSE: the CPU gradient and the reference gradient are the loss's derivative" do
      for opts <- [[], [reduction: :sum, scale: 1.5]] do
        ps = rand_values(7, {:f, 64})
        ys = rand_values(7, {:f, 64})
        yt = make(ys, {:f, 64}, {7}, :cpu)
        {_l, dp} = Loss.mse(make(ps, {:f, 64}, {7}, :cpu), yt, opts)

        lib_loss = fn xs ->
          {l, nil} = Loss.mse(make(xs, {:f, 64}, {7}, :cpu), yt, [grad: false] ++ opts)
          hd(read(l))
        end

        assert rel_err(read(dp), LossReference.finite_differences(lib_loss, ps)) <= 1.0e-7
        ref_loss = fn xs -> elem(LossReference.mse(xs, ys, opts), 0) end

        assert rel_err(
                 elem(LossReference.mse(ps, ys, opts), 1),
                 LossReference.finite_differences(ref_loss, ps)
               ) <= 1.0e-7
      end
    end
  end

  describe "determinism" do
    for {label, dev, tags} <- device_matrix() do
      @tag tags
      test "#{label}: bit-identical reruns, concurrent callers too" do
        dev = unquote(Macro.escape(dev))

        for {rows, c} <- [{700, 64}, {40, 3000}, {1, 1}] do
          lt = Tensor.random_uniform({rows, c}, seed: 5, min: -8.0, max: 8.0, device: dev)
          targets = for r <- 1..rows, do: if(rem(r, 7) == 0, do: -1, else: rem(r * 31, c))
          tt = make(targets, {:s, 32}, {rows}, dev)
          w = Tensor.random_uniform({c}, seed: 6, min: 0.5, max: 2.0, device: dev)

          for opts <- [[], [weights: w, ignore_index: -1]] do
            {l0, d0} = Loss.cross_entropy(lt, tt, opts)
            ref = {bits(l0), bits(d0)}

            results =
              1..4
              |> Task.async_stream(fn _ ->
                {l, d} = Loss.cross_entropy(lt, tt, opts)
                {bits(l), bits(d)}
              end)
              |> Enum.map(fn {:ok, r} -> r end)

            assert Enum.all?(results, &(&1 == ref)), "#{rows} x #{c} #{inspect(Keyword.keys(opts))}"
          end
        end

        pt = Tensor.random_uniform({500, 301}, seed: 7, device: dev)
        yt = Tensor.random_uniform({500, 301}, seed: 8, device: dev)
        {m0, g0} = Loss.mse(pt, yt)

        for _ <- 1..3 do
          {m, g} = Loss.mse(pt, yt)
          assert bits(m) == bits(m0) and bits(g) == bits(g0)
        end
      end
    end
  end

  describe "misuse" do
    defp args do
      lt = Tensor.random_uniform({4, 6}, seed: 1)
      tt = make([0, 5, 2, 1], {:s, 32}, {4}, :cpu)
      w = Tensor.random_uniform({6}, seed: 2)
      {lt, tt, w}
    end

    test "wrong tensors, shapes and types raise ArgumentError naming the argument" do
      {lt, tt, w} = args()
      f32 = fn shape -> Tensor.random_uniform(shape, seed: 3) end

      cases = [
        {fn -> Loss.cross_entropy(:x, tt) end, ~r/cross_entropy: logits must be a Mambex.Tensor/},
        {fn -> Loss.cross_entropy(lt, [1, 2]) end, ~r/targets must be a Mambex.Tensor/},
        {fn -> Loss.cross_entropy(lt, f32.({4})) end, ~r/targets must have type {:s, 32}/},
        {fn -> Loss.cross_entropy(lt, Tensor.zeros({4}, type: {:s, 64})) end,
         ~r/targets must have type {:s, 32}/},
        {fn -> Loss.cross_entropy(lt, make([0, 1, 2], {:s, 32}, {3}, :cpu)) end,
         ~r/targets must have the leading shape of logits, \{4\}, got: \{3\}/},
        {fn -> Loss.cross_entropy(lt, make([0, 1, 2, 3], {:s, 32}, {4, 1}, :cpu)) end,
         ~r/targets must have the leading shape/},
        {fn -> Loss.cross_entropy(Tensor.zeros({4, 6}, type: {:s, 32}), tt) end,
         ~r/logits must have type {:f, 32} or {:f, 64} on the CPU/},
        {fn -> Loss.cross_entropy(Tensor.fill({}, 1.0), make([0], {:s, 32}, {}, :cpu)) end,
         ~r/logits must have at least one axis/},
        {fn -> Loss.cross_entropy(Tensor.zeros({4, 0}), tt) end,
         ~r/logits must have at least one class/},
        {fn -> Loss.cross_entropy(lt, tt, weights: f32.({7})) end,
         ~r/weights must have shape \{6\}/},
        {fn -> Loss.cross_entropy(lt, tt, weights: f32.({1, 6})) end,
         ~r/weights must have shape \{6\}/},
        {fn -> Loss.cross_entropy(lt, tt, weights: Tensor.zeros({6}, type: {:f, 64})) end,
         ~r/weights must have type {:f, 32}/},
        {fn -> Loss.cross_entropy(lt, tt, weights: :w) end, ~r/weights must be a Mambex.Tensor/},
        {fn -> Loss.cross_entropy(lt, tt, reduction: :avg) end, ~r/reduction must be :mean or :sum/},
        {fn -> Loss.cross_entropy(lt, tt, scale: "2") end, ~r/scale must be a number/},
        {fn -> Loss.cross_entropy(lt, tt, grad: 1) end, ~r/grad must be true or false/},
        {fn -> Loss.cross_entropy(lt, tt, ignore_index: 1.5) end, ~r/ignore_index must be an integer/},
        {fn -> Loss.cross_entropy(lt, tt, ignore_index: Integer.pow(2, 70)) end,
         ~r/ignore_index must be an integer \(64-bit\)/},
        {fn -> Loss.cross_entropy(lt, tt, label_smoothing: 0.1) end, ~r/unknown keys/},
        {fn -> Loss.cross_entropy(lt, tt, :mean) end, ~r/options must be a keyword list/},
        {fn -> Loss.mse(lt, f32.({4, 5})) end, ~r/mse: target must have the shape of pred, \{4,6\}/},
        {fn -> Loss.mse(lt, Tensor.zeros({4, 6}, type: {:f, 64})) end,
         ~r/target must have type {:f, 32} \(the type of pred\)/},
        {fn -> Loss.mse(Tensor.zeros({3}, type: {:s, 32}), Tensor.zeros({3}, type: {:s, 32})) end,
         ~r/pred must have type/},
        {fn -> Loss.mse(:p, lt) end, ~r/pred must be a Mambex.Tensor/},
        {fn -> Loss.mse(lt, nil) end, ~r/target must be a Mambex.Tensor/},
        {fn -> Loss.mse(lt, lt, reduction: :none) end, ~r/reduction must be :mean or :sum/},
        {fn -> Loss.mse(lt, lt, weights: w) end, ~r/unknown keys/}
      ]

      for {fun, msg} <- cases do
        assert_raise ArgumentError, msg, fun
      end

      # f64 logits take f64 weights (param == io on the CPU)
      l64 = Tensor.random_uniform({4, 6}, seed: 1, type: {:f, 64})
      assert {_, _} = Loss.cross_entropy(l64, tt, weights: Tensor.ones({6}, type: {:f, 64}))

      assert_raise ArgumentError, ~r/weights must have type {:f, 64}/, fn ->
        Loss.cross_entropy(l64, tt, weights: w)
      end
    end

    test "freed tensors raise ArgumentError naming the argument" do
      for key <- [:logits, :targets, :weights] do
        {lt, tt, w} = args()
        Tensor.free(%{logits: lt, targets: tt, weights: w}[key])

        assert_raise ArgumentError, ~r/cross_entropy: #{key} was freed/, fn ->
          Loss.cross_entropy(lt, tt, weights: w)
        end
      end

      {lt, _tt, _w} = args()
      yt = Tensor.random_uniform({4, 6}, seed: 4)
      Tensor.free(yt)
      assert_raise ArgumentError, ~r/mse: target was freed/, fn -> Loss.mse(lt, yt) end
      Tensor.free(lt)
      assert_raise ArgumentError, ~r/mse: pred was freed/, fn -> Loss.mse(lt, yt) end
    end

    @garbage [:foo, 2.5, "bytes", [], [1], {}, {1, 2}, %{}, %{ref: :nope}, {:cuda, 99}, self()]

    test "garbage in every argument of both NIFs raises ArgumentError, never crashes" do
      {lt, tt, w} = args()
      bogus = %Tensor{ref: make_ref(), shape: {4, 6}, type: {:f, 32}, device: :cpu}
      xent = [lt, tt, w, :mean, -100, 1.0, true]
      mse = [lt, lt, :sum, 2, false]
      # values a position takes (numbers for scale, integers for ignore_index)
      valid? = fn
        :xent, 4, j -> is_integer(j)
        :xent, 5, j -> is_number(j)
        :mse, 3, j -> is_number(j)
        _, _, _ -> false
      end

      for {kind, args0} <- [xent: xent, mse: mse],
          pos <- 0..(length(args0) - 1),
          junk <- [bogus, nil, -1, 1 | @garbage],
          not valid?.(kind, pos, junk),
          not (junk == nil and kind == :xent and pos in [2, 4]) do
        args = List.replace_at(args0, pos, junk)
        fun = if kind == :xent, do: :cross_entropy, else: :mse

        assert arg_error_outcome(fn -> apply(Mambex.NIF, fun, args) end) == nil,
               "#{fun} argument #{pos} = #{inspect(junk)}"
      end

      assert {%Tensor{}, %Tensor{}} = apply(Mambex.NIF, :cross_entropy, xent)
      assert {%Tensor{}, nil} = apply(Mambex.NIF, :mse, mse)
    end
  end

  describe "CUDA" do
    @describetag :cuda

    defp cuda, do: Mambex.TestHelpers.cuda_device()

    for {name, lead, c, opts} <- @xent_cases do
      test "f32 cross-entropy against the reference: #{name}" do
        check_xent(unquote(name), unquote(Macro.escape(lead)), unquote(c), unquote(opts), cuda(),
          {:f, 32}, 1.0e-5, 1.0e-4)
      end
    end

    test "bf16 io cross-entropy against the reference (1e-2)" do
      # (f32 io in the CPU self-check mode: the CPU takes f32/f64 only)
      io = if cuda() == :cpu, do: {:f, 32}, else: {:bf, 16}

      for {name, lead, c, opts} <- @xent_cases do
        check_xent("bf16 " <> name, lead, c, opts, cuda(), io, 1.0e-2, 1.0e-2)
      end
    end

    test "MSE f32 and bf16 against the reference" do
      io16 = if cuda() == :cpu, do: {:f, 32}, else: {:bf, 16}

      for {name, shape, opts} <- @mse_cases ++ [{"big, odd", {3001, 37}, [reduction: :sum]}] do
        check_mse(name, shape, opts, cuda(), {:f, 32}, 1.0e-5, 1.0e-5)
        check_mse("bf16 " <> name, shape, opts, cuda(), io16, 1.0e-2, 1.0e-2)
      end
    end

    test "CPU and CUDA agree (f32), warp and block paths" do
      dev = cuda()

      for {rows, c} <- [{2000, 64}, {301, 1000}, {37, 3000}, {3, 50_257}],
          opts <- [[], [weights: true, ignore_index: -100, scale: 0.5]] do
        p = xent_problem({rows}, c, {:f, 32}, {:f, 32}, opts)
        {lc, dc} = run_xent(p, :cpu, {:f, 32})
        {lg, dg} = run_xent(p, dev, {:f, 32})
        assert rel_err(read(lg), read(lc)) <= 1.0e-5, "#{rows} x #{c}"
        assert rel_err(read(dg), read(dc)) <= 1.0e-4, "#{rows} x #{c}"
      end
    end

    test "tensors on two devices raise ArgumentError naming the argument" do
      if cuda() != :cpu do
        dev = cuda()
        lt = Tensor.random_uniform({4, 6}, seed: 1, device: dev)
        tt = make([0, 5, 2, 1], {:s, 32}, {4}, dev)

        assert_raise ArgumentError, ~r/targets is on cpu but logits is on {cuda,0}/, fn ->
          Loss.cross_entropy(lt, make([0, 5, 2, 1], {:s, 32}, {4}, :cpu))
        end

        assert_raise ArgumentError, ~r/weights is on cpu/, fn ->
          Loss.cross_entropy(lt, tt, weights: Tensor.ones({6}))
        end

        assert_raise ArgumentError, ~r/logits must have type {:f, 32} or {:bf, 16} on CUDA/, fn ->
          Loss.cross_entropy(Tensor.zeros({4, 6}, type: {:f, 64}, device: dev), tt)
        end

        assert_raise ArgumentError, ~r/weights must have type {:f, 32}/, fn ->
          Loss.cross_entropy(Tensor.zeros({4, 6}, type: {:bf, 16}, device: dev), tt,
            weights: Tensor.ones({6}, type: {:bf, 16}, device: dev)
          )
        end

        assert_raise ArgumentError, ~r/target is on cpu but pred is on {cuda,0}/, fn ->
          Loss.mse(lt, Tensor.ones({4, 6}))
        end
      end
    end
  end
end

defmodule Mambex.LossMemoryTest do
  # Live bytes and handles are global per device: not async.
  use ExUnit.Case, async: false

  import Mambex.TestHelpers
  alias Mambex.{Loss, Tensor}

  defp leak_check(device) do
    Mambex.TestHelpers.assert_no_leak(
      device,
      fn ->
        lt = Tensor.random_uniform({9, 1100}, seed: 1, device: device)
        ls = Tensor.random_uniform({13, 70}, seed: 2, device: device)
        tt = make(Enum.to_list(0..8), {:s, 32}, {9}, device)
        ts = make(Enum.map(0..12, &rem(&1 * 5, 70)), {:s, 32}, {13}, device)
        w = Tensor.ones({70}, device: device)
        bad = Tensor.zeros({13}, type: {:f, 32}, device: device)

        for i <- 1..300 do
          {a, b} = Loss.cross_entropy(lt, tt)
          {c, d} = Loss.cross_entropy(ls, ts, weights: w, ignore_index: 3)
          {e, f} = Loss.mse(lt, lt, reduction: :sum)
          if rem(i, 2) == 0, do: Enum.each([a, b, c, d, e, f], &Tensor.free/1)

          try do
            Loss.cross_entropy(ls, bad)
          rescue
            ArgumentError -> :ok
          end
        end

        :erlang.garbage_collect()
      end
    )
  end

  test "live bytes and handles return to their start after many calls, failed ones included" do
    leak_check(:cpu)
  end

  @tag :cuda
  test "on CUDA too" do
    leak_check(cuda_device())
  end
end
