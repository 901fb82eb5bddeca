Code.require_file("support/adamw_reference.exs", __DIR__)

defmodule Mambex.AdamWTest do
  # Mambex.AdamW against the float64 reference (test/support/adamw_reference.exs):
  # several steps over many tensors of odd sizes, with and without clipping,
  # decay masks and learning-rate changes; the step counter and the norm;
  # many tensors in one call (several CUDA launches) against separate calls;
  # determinism, leaks and misuse. Inputs are random (never zero), seeded
  # from ExUnit's seed and the test name (printed on failure).
  use ExUnit.Case, async: true

  import Mambex.TestHelpers
  alias Mambex.{AdamW, AdamWReference, Tensor}

  # f32 parameters after a few steps: p itself and its change (p - p0) within
  # these relative errors of the reference; m and v likewise. The change is
  # a difference of two f32 values of magnitude up to 2, so its error is
  # about ulp(2) = 2.4e-7 absolute against changes of about lr = 0.01..0.1.
  @tol_p 1.0e-6
  @tol_delta 1.0e-4
  @tol_mv 1.0e-5

  @shapes %{w1: {25, 41}, b1: {1}, w2: {3, 1, 1}, b2: {1000}, e: {3}, w3: {7, 8}}

  defp seed!(ctx) do
    seed_rand(ctx)
    "(ExUnit seed #{base_seed()}, test #{inspect(ctx.test)})"
  end

  defp make_params(shapes, device) do
    for {name, shape} <- shapes, into: %{} do
      {t, vals} = rand_tensor(shape, {:f, 32}, device, lo: 0.1, hi: 2.0)
      {name, {t, vals}}
    end
  end

  defp rand_grads(shapes, device, scale) do
    for {name, shape} <- shapes, into: %{} do
      vals = rand_values(numel(shape), {:f, 32}, lo: 0.01 * scale, hi: scale)
      {name, {make(vals, {:f, 32}, shape, device), vals}}
    end
  end

  defp tensors(map), do: Map.new(map, fn {k, {t, _}} -> {k, t} end)
  defp values(map, names), do: Enum.map(names, fn n -> elem(Map.fetch!(map, n), 1) end)

  defp f32(x), do: quantize(x, {:f, 32})

  defp assert_close(out, ref, tol, label) do
    out = List.flatten(out)
    ref = List.flatten(ref)
    err = rel_err(out, ref)
    assert is_number(err) and err <= tol, "#{label}: relative error #{inspect(err)} > #{tol}"
  end

  # Runs `steps` AdamW steps on `device` and in the reference, comparing
  # params, m, v, the step counter and the norm after each step.
  # lrs: one learning rate per step (set with set_lr before the step).
  defp run_against_reference(device, shapes, opts, lrs, note) do
    params = make_params(shapes, device)
    names = params |> Map.keys() |> Enum.sort()
    p_t = tensors(params)
    # (a function cannot be a module attribute: :every stands for one)
    opts =
      if opts[:decay] == :every, do: Keyword.put(opts, :decay, fn _, _ -> true end), else: opts

    init_opts = Keyword.merge([lr: hd(lrs)], Keyword.delete(opts, :grad_scale))
    state = AdamW.init(p_t, init_opts)
    decay = Enum.map(names, &state.decay[&1])

    ref_opts = [
      beta1: elem(Keyword.get(opts, :betas, {0.9, 0.999}), 0),
      beta2: elem(Keyword.get(opts, :betas, {0.9, 0.999}), 1),
      eps: Keyword.get(opts, :eps, 1.0e-8),
      weight_decay: Keyword.get(opts, :weight_decay, 0.01),
      max_norm: Keyword.get(opts, :max_grad_norm)
    ]

    p0 = values(params, names)

    Enum.reduce(Enum.with_index(lrs, 1), {state, p0, AdamWReference.init(p0)}, fn {lr, k},
                                                                                  {st, ref_p,
                                                                                   ref_s} ->
      st = AdamW.set_lr(st, lr)
      grads = rand_grads(shapes, device, Keyword.get(opts, :grad_scale, 1.0))
      st = AdamW.step(st, p_t, tensors(grads))
      g = values(grads, names)

      {new_p, new_s, norm} =
        AdamWReference.step(ref_p, g, decay, ref_s, [{:lr, f32(lr)} | ref_opts])

      out_p = Enum.map(names, &read(p_t[&1]))
      label = "step #{k} #{note}"
      assert_close(out_p, new_p, @tol_p, "params " <> label)

      d_out = Enum.zip_with(List.flatten(out_p), List.flatten(ref_p), &(&1 - &2))
      d_ref = Enum.zip_with(List.flatten(new_p), List.flatten(ref_p), &(&1 - &2))
      assert_close(d_out, d_ref, @tol_delta, "param change " <> label)
      assert_close(Enum.map(names, &read(st.m[&1])), new_s.m, @tol_mv, "m " <> label)
      assert_close(Enum.map(names, &read(st.v[&1])), new_s.v, @tol_mv, "v " <> label)
      assert AdamW.step_count(st) == k, label
      assert_in_delta AdamW.lr(st), f32(lr), 0.0

      if st.track_grad_norm do
        assert_in_delta AdamW.grad_norm(st), norm, 1.0e-6 * norm, "grad norm " <> label
      else
        assert AdamW.grad_norm(st) == nil
      end

      # the next step starts from what the kernel produced (as f32)
      {st, out_p,
       %{new_s | m: Enum.map(names, &read(st.m[&1])), v: Enum.map(names, &read(st.v[&1]))}}
    end)
  end

  @cases [
    {"no clipping", [], [0.05, 0.05, 0.05]},
    {"clipping active", [max_grad_norm: 1.0], [0.05, 0.02, 0.05, 0.1]},
    {"clipping inactive, norm tracked", [max_grad_norm: 1.0e6], [0.03, 0.03]},
    {"norm tracked, no clipping, no decay", [grad_norm: true, weight_decay: 0.0], [0.05, 0.01]},
    {"decay on every tensor, other betas",
     [decay: :every, betas: {0.8, 0.95}, eps: 1.0e-3, weight_decay: 0.1], [0.05, 0.05, 0.2]},
    {"decay by name, beta1 0", [decay: [:b2, :w1], betas: {0.0, 0.5}, max_grad_norm: 3.0],
     [0.1, 0.1]}
  ]

  for {label, dev, tags} <- device_matrix() do
    describe "#{label}: against the float64 reference" do
      @describetag tags
      @describetag device: dev

      for {name, opts, lrs} <- @cases do
        @opts opts
        @lrs lrs
        test "#{name}", ctx do
          note = seed!(ctx)
          device = ctx.device
          run_against_reference(device, @shapes, @opts, @lrs, note)
        end
      end

      test "tiny gradients: the clip factor stays 1 and eps matters", ctx do
        note = seed!(ctx)
        device = ctx.device

        run_against_reference(
          device,
          %{a: {5}, b: {4, 3}},
          [max_grad_norm: 1.0, grad_scale: 1.0e-6, eps: 1.0e-6],
          [0.01, 0.01],
          note
        )
      end
    end
  end

  describe "the three forms of params" do
    test "map, keyword list and list give the same bits", ctx do
      note = seed!(ctx)
      shapes = [{:a, {3, 5}}, {:b, {7}}]

      vals = for {_, s} <- shapes, do: rand_values(numel(s), {:f, 32})
      grads = for {_, s} <- shapes, do: rand_values(numel(s), {:f, 32})

      mk = fn list ->
        Enum.zip_with(list, shapes, fn v, {_, s} -> make(v, {:f, 32}, s, :cpu) end)
      end

      run = fn form ->
        ps = mk.(vals)
        gs = mk.(grads)

        {p, g} =
          case form do
            :map -> {Map.new(Enum.zip([:a, :b], ps)), Map.new(Enum.zip([:a, :b], gs))}
            :keyword -> {Enum.zip([:a, :b], ps), Enum.zip([:a, :b], gs)}
            :list -> {ps, gs}
          end

        st = AdamW.init(p, lr: 0.1, max_grad_norm: 2.0)
        st = AdamW.step(st, p, g)
        _ = AdamW.step(st, p, g)
        Enum.map(ps, &Tensor.to_binary/1)
      end

      assert run.(:map) == run.(:keyword), note
      assert run.(:map) == run.(:list), note
    end
  end

  for {label, dev, tags} <- device_matrix() do
    describe "#{label}: many tensors" do
      @describetag tags
      @describetag device: dev

      test "200 tensors in one call: the bits of 200 separate optimisers (no norm)", ctx do
        note = seed!(ctx)
        device = ctx.device
        sizes = for i <- 1..200, do: rem(i * 37, 101) + if(rem(i, 50) == 0, do: 3000, else: 0)
        vals = Enum.map(sizes, &rand_values(&1, {:f, 32}))
        grads = Enum.map(sizes, &rand_values(&1, {:f, 32}))
        mk = fn vs -> Enum.zip_with(vs, sizes, &make(&1, {:f, 32}, {&2}, device)) end

        together = mk.(vals)
        g = mk.(grads)
        st = AdamW.init(together, lr: 0.05, decay: fn i, _ -> rem(i, 3) == 0 end)
        st = AdamW.step(st, together, g)
        _ = AdamW.step(st, together, g)

        separate = mk.(vals)

        for {{p, gr}, i} <- Enum.with_index(Enum.zip(separate, g)) do
          s1 = AdamW.init([p], lr: 0.05, decay: fn _, _ -> rem(i, 3) == 0 end)
          s1 = AdamW.step(s1, [p], [gr])
          AdamW.step(s1, [p], [gr])
        end

        for {{a, b}, i} <- Enum.with_index(Enum.zip(together, separate)) do
          assert Tensor.to_binary(a) == Tensor.to_binary(b), "tensor #{i} differs #{note}"
        end

        assert AdamW.step_count(st) == 2
      end

      test "200 tensors with clipping against the reference; the norm over all of them", ctx do
        note = seed!(ctx)
        device = ctx.device
        sizes = for i <- 1..200, do: rem(i * 53, 67) + 1
        vals = Enum.map(sizes, &rand_values(&1, {:f, 32}))
        grads = Enum.map(sizes, &rand_values(&1, {:f, 32}))
        ps = Enum.zip_with(vals, sizes, &make(&1, {:f, 32}, {&2}, device))
        gs = Enum.zip_with(grads, sizes, &make(&1, {:f, 32}, {&2}, device))
        st = AdamW.init(ps, lr: 0.05, max_grad_norm: 5.0, decay: fn i, _ -> rem(i, 2) == 0 end)
        st = AdamW.step(st, ps, gs)

        decay = for i <- 0..199, do: rem(i, 2) == 0

        {ref, _, norm} =
          AdamWReference.step(vals, grads, decay, AdamWReference.init(vals),
            lr: f32(0.05),
            beta1: 0.9,
            beta2: 0.999,
            eps: 1.0e-8,
            weight_decay: 0.01,
            max_norm: 5.0
          )

        assert_close(Enum.map(ps, &read/1), ref, @tol_p, "params #{note}")
        assert_in_delta AdamW.grad_norm(st), norm, 1.0e-6 * norm
      end

      # 300,001 elements: 74 tiles on CUDA, one launch with the norm inside;
      # 1,200,001: 293 tiles, more than an H200 holds at once (264), so the
      # separate norm launch runs.
      for n <- [300_001, 1_200_001] do
        test "a large tensor (threaded on the CPU, several tiles on CUDA) with clipping, n #{n}",
             ctx do
          note = seed!(ctx)
          device = ctx.device
          # uniform values made on the device, read back for the reference
          n = unquote(n)
          p = Tensor.random_uniform({n}, seed: 11, min: 0.5, max: 1.5, device: device)
          g = Tensor.random_uniform({n}, seed: 12, min: -1.0, max: 1.0, device: device)
          b = Tensor.random_uniform({3, 7}, seed: 13, min: 0.5, max: 1.5, device: device)
          gb = Tensor.random_uniform({3, 7}, seed: 14, min: -1.0, max: 1.0, device: device)
          pv = [read(p), read(b)]
          gv = [read(g), read(gb)]
          st = AdamW.init([p, b], lr: 0.01, max_grad_norm: 10.0)
          st = AdamW.step(st, [p, b], [g, gb])

          {ref, _, norm} =
            AdamWReference.step(pv, gv, [false, true], AdamWReference.init(pv),
              lr: f32(0.01),
              beta1: 0.9,
              beta2: 0.999,
              eps: 1.0e-8,
              weight_decay: 0.01,
              max_norm: 10.0
            )

          assert_close([read(p), read(b)], ref, @tol_p, "params #{note}")
          assert_in_delta AdamW.grad_norm(st), norm, 1.0e-6 * norm
        end
      end

      test "bit-identical reruns with clipping", ctx do
        _ = seed!(ctx)
        device = ctx.device
        sizes = [1, 3, 1000, 1025, 200_003, 4096]

        run = fn ->
          ps =
            for {n, i} <- Enum.with_index(sizes),
                do: Tensor.random_uniform({n}, seed: i, min: -1.0, max: 1.0, device: device)

          gs =
            for {n, i} <- Enum.with_index(sizes),
                do: Tensor.random_uniform({n}, seed: 100 + i, min: -1.0, max: 1.0, device: device)

          st = AdamW.init(ps, lr: 0.01, max_grad_norm: 1.0)
          st = Enum.reduce(1..3, st, fn _, s -> AdamW.step(s, ps, gs) end)
          {Enum.map(ps, &Tensor.to_binary/1), Tensor.to_binary(st.grad_norm)}
        end

        assert run.() == run.()
      end

      test "empty tensors are allowed and the step still counts", ctx do
        device = ctx.device
        p = Tensor.zeros({0}, device: device)
        g = Tensor.zeros({0}, device: device)
        st = AdamW.init(%{p: p}, max_grad_norm: 1.0)
        st = AdamW.step(st, %{p: p}, %{p: g})
        assert AdamW.step_count(st) == 1
        assert AdamW.grad_norm(st) == 0.0
      end
    end
  end

  test "set_lr takes a device tensor; the state defaults", ctx do
    _ = seed!(ctx)
    {p, _} = rand_tensor({4, 4}, {:f, 32}, :cpu)
    {b, _} = rand_tensor({4}, {:f, 32}, :cpu)
    st = AdamW.init(%{w: p, b: b})
    assert st.decay == %{w: true, b: false}
    assert AdamW.step_count(st) == 0
    assert_in_delta AdamW.lr(st), 1.0e-3, 1.0e-10
    assert AdamW.grad_norm(st) == nil
    lr = Tensor.fill({1}, 0.25)
    st = AdamW.set_lr(st, lr)
    assert AdamW.lr(st) == 0.25
    assert_raise ArgumentError, ~r/lr/, fn -> AdamW.set_lr(st, Tensor.fill({2}, 0.25)) end

    assert_raise ArgumentError, ~r/lr/, fn ->
      AdamW.set_lr(st, Tensor.fill({}, 1, type: {:f, 64}))
    end

    assert_raise ArgumentError, ~r/lr/, fn -> AdamW.set_lr(st, :fast) end
  end

  describe "misuse raises ArgumentError naming the argument" do
    setup ctx do
      _ = seed!(ctx)
      {w, _} = rand_tensor({3, 4}, {:f, 32}, :cpu)
      {b, _} = rand_tensor({4}, {:f, 32}, :cpu)
      {gw, _} = rand_tensor({3, 4}, {:f, 32}, :cpu)
      {gb, _} = rand_tensor({4}, {:f, 32}, :cpu)
      params = %{w: w, b: b}
      %{params: params, grads: %{w: gw, b: gb}, state: AdamW.init(params)}
    end

    test "a missing gradient, an unknown name, a wrong shape or type", c do
      assert_raise ArgumentError, ~r/grads has no tensor for parameter :b/, fn ->
        AdamW.step(c.state, c.params, Map.delete(c.grads, :b))
      end

      assert_raise ArgumentError, ~r/params has no tensor for parameter :w/, fn ->
        AdamW.step(c.state, Map.delete(c.params, :w), c.grads)
      end

      assert_raise ArgumentError, ~r/names the optimiser was not made for: \[:x\]/, fn ->
        AdamW.step(c.state, c.params, Map.put(c.grads, :x, c.grads.b))
      end

      assert_raise ArgumentError, ~r/grads\[:w\] must have shape \{3, 4\}/, fn ->
        AdamW.step(c.state, c.params, %{c.grads | w: Tensor.zeros({4, 3})})
      end

      assert_raise ArgumentError, ~r/grads\[:b\] must have type \{:f, 32\}/, fn ->
        AdamW.step(c.state, c.params, %{c.grads | b: Tensor.zeros({4}, type: {:f, 64})})
      end

      assert_raise ArgumentError, ~r/params\[:w\] must have shape/, fn ->
        AdamW.step(c.state, %{c.params | w: Tensor.zeros({12})}, c.grads)
      end

      assert_raise ArgumentError, ~r/grads\[:b\] must be a Mambex.Tensor/, fn ->
        AdamW.step(c.state, c.params, %{c.grads | b: [1.0, 2.0]})
      end

      assert_raise ArgumentError, ~r/params must be a map/, fn ->
        AdamW.step(c.state, :x, c.grads)
      end

      assert_raise ArgumentError, ~r/state must be a Mambex.AdamW/, fn ->
        AdamW.step(%{}, c.params, c.grads)
      end
    end

    test "non-f32 parameters and bad options at init", c do
      assert_raise ArgumentError, ~r/params\[:x\] must have type \{:f, 32\}/, fn ->
        AdamW.init(%{x: Tensor.zeros({2}, type: {:f, 64})})
      end

      assert_raise ArgumentError, ~r/params\[:x\] must have type \{:f, 32\}/, fn ->
        AdamW.init(%{x: Tensor.zeros({2}, type: {:bf, 16})})
      end

      assert_raise ArgumentError, ~r/empty/, fn -> AdamW.init(%{}) end

      assert_raise ArgumentError, ~r/unknown options \[:momentum\]/, fn ->
        AdamW.init(c.params, momentum: 0.9)
      end

      assert_raise ArgumentError, ~r/:betas/, fn -> AdamW.init(c.params, betas: {0.9, 1.0}) end
      assert_raise ArgumentError, ~r/:betas/, fn -> AdamW.init(c.params, betas: 0.9) end
      assert_raise ArgumentError, ~r/:eps/, fn -> AdamW.init(c.params, eps: -1.0) end

      assert_raise ArgumentError, ~r/:weight_decay/, fn ->
        AdamW.init(c.params, weight_decay: :x)
      end

      assert_raise ArgumentError, ~r/:max_grad_norm/, fn ->
        AdamW.init(c.params, max_grad_norm: 0)
      end

      assert_raise ArgumentError, ~r/:grad_norm/, fn -> AdamW.init(c.params, grad_norm: 1) end

      assert_raise ArgumentError, ~r/:decay names unknown/, fn ->
        AdamW.init(c.params, decay: [:z])
      end

      assert_raise ArgumentError, ~r/:decay returned/, fn ->
        AdamW.init(c.params, decay: fn _, _ -> 1 end)
      end

      assert_raise ArgumentError, ~r/:decay must be/, fn -> AdamW.init(c.params, decay: :all) end
      assert_raise ArgumentError, ~r/lr must be/, fn -> AdamW.init(c.params, lr: "1") end

      assert_raise ArgumentError, ~r/options must be a keyword list/, fn ->
        AdamW.init(c.params, 3)
      end
    end

    test "freed tensors", c do
      Tensor.free(c.grads.b)

      assert_raise ArgumentError, ~r/grads\[:b\] was freed/, fn ->
        AdamW.step(c.state, c.params, c.grads)
      end

      {gb, _} = rand_tensor({4}, {:f, 32}, :cpu)
      grads = %{c.grads | b: gb}
      Tensor.free(c.state.m.w)

      assert_raise ArgumentError, ~r/m\[:w\] was freed/, fn ->
        AdamW.step(c.state, c.params, grads)
      end

      st = AdamW.init(c.params)
      Tensor.free(c.params.w)

      assert_raise ArgumentError, ~r/params\[:w\] was freed/, fn ->
        AdamW.step(st, c.params, grads)
      end

      assert_raise ArgumentError, ~r/params\[:w\] was freed/, fn -> AdamW.init(c.params) end

      st = AdamW.init(%{b: c.params.b})
      Tensor.free(st.step)

      assert_raise ArgumentError, ~r/step was freed/, fn ->
        AdamW.step(st, %{b: c.params.b}, %{b: gb})
      end
    end

    test "a parameter given twice, or as its own gradient, is refused", c do
      st = AdamW.init([c.params.w, c.params.w])

      assert_raise ArgumentError,
                   ~r/params\[0\] and params\[1\] share memory|params\[1\] and params\[0\] share memory/,
                   fn ->
                     AdamW.step(st, [c.params.w, c.params.w], [c.grads.w, c.grads.w])
                   end

      st = AdamW.init(%{w: c.params.w})

      assert_raise ArgumentError, ~r/share memory/, fn ->
        AdamW.step(st, %{w: c.params.w}, %{w: c.params.w})
      end

      # a reshaped view of the same storage is caught too
      assert_raise ArgumentError, ~r/share memory/, fn ->
        AdamW.step(st, %{w: c.params.w}, %{w: Tensor.reshape(st.m.w, {3, 4})})
      end

      # the same gradient for two parameters is fine (read only)
      st = AdamW.init([c.params.w, c.grads.w])
      g = Tensor.zeros({3, 4})
      assert %AdamW{} = AdamW.step(st, [c.params.w, c.grads.w], [g, g])
    end

    test "garbage in every argument of the NIF never crashes", c do
      w = c.params.w
      g = c.grads.w
      m = c.state.m.w
      v = c.state.v.w
      s = c.state.step
      lr = c.state.lr
      good = [[w], [g], [m], [v], [true], s, lr, false, {0.9, 0.999, 1.0e-8, 0.01, 0.0}]
      assert nil == apply(Mambex.NIF, :adamw_step, good)

      garbage = [
        :x,
        1,
        -1.0,
        "s",
        [1],
        [:x],
        {},
        nil,
        [w, w],
        %{},
        Tensor.zeros({}, type: {:s, 32}),
        Tensor.zeros({2}),
        {0.9, 0.999, 1.0e-8, 0.01},
        {1.0, 0.9, 0.0, 0.0, 0.0},
        {0.9, 0.9, -1.0, 0.0, 0.0},
        {0.9, 0.9, 0.0, :nan, 0.0}
      ]

      for i <- 0..(length(good) - 1), bad <- garbage do
        args = List.replace_at(good, i, bad)

        if args != good do
          outcome = arg_error_outcome(fn -> apply(Mambex.NIF, :adamw_step, args) end)

          # a few replacements are valid arguments (e.g. want_norm never; lists of the same tensor for grads)
          assert outcome == nil or match?({:returned, _}, outcome),
                 "argument #{i} = #{inspect(bad)}: #{inspect(outcome)}"
        end
      end

      assert_raise ArgumentError, ~r/adamw_step: grads has 2 tensors but params has 1/, fn ->
        Mambex.NIF.adamw_step(
          [w],
          [g, g],
          [m],
          [v],
          [true],
          s,
          lr,
          false,
          {0.9, 0.999, 1.0e-8, 0.01, 0.0}
        )
      end

      assert_raise ArgumentError, ~r/beta1 must be in \[0, 1\)/, fn ->
        Mambex.NIF.adamw_step(
          [w],
          [g],
          [m],
          [v],
          [true],
          s,
          lr,
          false,
          {1.0, 0.999, 1.0e-8, 0.01, 0.0}
        )
      end

      assert_raise ArgumentError, ~r/step must be an \{:s, 32\} tensor/, fn ->
        Mambex.NIF.adamw_step(
          [w],
          [g],
          [m],
          [v],
          [true],
          lr,
          lr,
          false,
          {0.9, 0.999, 1.0e-8, 0.01, 0.0}
        )
      end
    end
  end

  describe "CUDA" do
    @describetag :cuda

    test "CPU and CUDA agree: bit for bit without clipping, 1e-6 relative with it", ctx do
      note = seed!(ctx)
      sizes = [1, 3, 1000, 1025, 4099, 100_003]
      cuda = cuda_device()

      for clip <- [nil, 1.0] do
        vals = Enum.map(sizes, &rand_values(&1, {:f, 32}))
        grads = Enum.map(sizes, &rand_values(&1, {:f, 32}))

        run = fn device ->
          ps = Enum.zip_with(vals, sizes, &make(&1, {:f, 32}, {&2}, device))
          gs = Enum.zip_with(grads, sizes, &make(&1, {:f, 32}, {&2}, device))

          st =
            AdamW.init(ps,
              lr: 0.01,
              max_grad_norm: clip,
              grad_norm: true,
              decay: fn i, _ -> rem(i, 2) == 1 end
            )

          st =
            Enum.reduce([0.01, 0.02, 0.005], st, fn lr, s ->
              s |> AdamW.set_lr(lr) |> AdamW.step(ps, gs)
            end)

          {Enum.map(ps, &read/1), Enum.map(st.names, &read(st.m[&1])), AdamW.grad_norm(st)}
        end

        {p_cpu, m_cpu, n_cpu} = run.(:cpu)
        {p_gpu, m_gpu, n_gpu} = run.(cuda)
        assert_in_delta n_cpu, n_gpu, 1.0e-6 * n_cpu, note
        # the norm is summed in a different order on each backend; the
        # elementwise update is the same IEEE f32 sequence on both
        assert_close(p_gpu, p_cpu, 1.0e-6, "params (clip #{inspect(clip)}) #{note}")
        assert_close(m_gpu, m_cpu, 1.0e-6, "m (clip #{inspect(clip)}) #{note}")

        if clip == nil,
          do: assert(p_gpu == p_cpu, "params differ in bits without clipping #{note}")
      end
    end

    test "tensors on two devices raise ArgumentError naming the argument", ctx do
      _ = seed!(ctx)
      cuda = cuda_device()

      if cuda != :cpu do
        {w, _} = rand_tensor({3}, {:f, 32}, cuda)
        {g, _} = rand_tensor({3}, {:f, 32}, :cpu)
        st = AdamW.init(%{w: w})

        assert_raise ArgumentError, ~r/grads\[:w\] is on :cpu/, fn ->
          AdamW.step(st, %{w: w}, %{w: g})
        end

        assert_raise ArgumentError, ~r/params\[:(b|w)\] is on/, fn ->
          AdamW.init(%{w: w, b: g})
        end

        assert_raise ArgumentError, ~r/lr/, fn -> AdamW.set_lr(st, Tensor.fill({}, 0.1)) end

        assert_raise ArgumentError, ~r/grads\[0\] is on :?cpu but step is on/, fn ->
          Mambex.NIF.adamw_step(
            [w],
            [g],
            [st.m.w],
            [st.v.w],
            [true],
            st.step,
            st.lr,
            false,
            {0.9, 0.999, 1.0e-8, 0.01, 0.0}
          )
        end
      end
    end
  end
end

defmodule Mambex.AdamWLeakTest do
  # Memory statistics are per device and global: this module is `async: false`
  # (ExUnit runs it alone, after the async modules), and the steps run in a
  # process of their own, so every tensor they made is dead when it exits.
  use ExUnit.Case, async: false

  import Mambex.TestHelpers
  alias Mambex.{AdamW, Tensor}

  defp leak_check(device) do
    Mambex.TestHelpers.assert_no_leak(
      device,
      fn ->
        sizes = [1, 3, 1025, 70_000]
        ps = for n <- sizes, do: Tensor.random_uniform({n}, seed: n, device: device)
        gs = for n <- sizes, do: Tensor.random_uniform({n}, seed: n + 1, device: device)
        st = AdamW.init(ps, max_grad_norm: 1.0)

        st =
          Enum.reduce(1..300, st, fn i, s ->
            s |> AdamW.set_lr(1.0e-3 / i) |> AdamW.step(ps, gs)
          end)

        # failing calls hold nothing either (shapes swapped)
        for _ <- 1..50 do
          try do
            AdamW.step(st, ps, Enum.reverse(gs))
          rescue
            ArgumentError -> :ok
          end
        end

        300 = AdamW.step_count(st)
      end,
      60_000
    )
  end

  test "live bytes and handles return to their start after many steps" do
    leak_check(:cpu)
  end

  @tag :cuda
  test "on CUDA too" do
    leak_check(cuda_device())
  end
end
