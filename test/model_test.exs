defmodule Mambex.ModelTest do
  use ExUnit.Case, async: false

  alias Mambex.{Checkpoint, Loss, Model, SelectiveCopying, Tensor}
  import Mambex.TestHelpers

  @tiny [features: 3, outputs: 4, d_model: 8, n_layers: 2, d_state: 4, d_conv: 3]

  defp data(shape_b, shape_l, f, classes, type, seed) do
    :rand.seed(:exsss, {seed, 1, 2})
    x = for _ <- 1..(shape_b * shape_l * f), do: :rand.uniform() * 2 - 1
    bin = encode(x, type)
    inputs = Tensor.from_binary(bin, type, shape: {shape_b, shape_l, f})
    # one ignored step per sequence
    t = for i <- 0..(shape_b * shape_l - 1), do: if(rem(i, shape_l) == 1, do: -1, else: :rand.uniform(classes) - 1)
    targets = Tensor.from_binary(encode(t, {:s, 32}), {:s, 32}, shape: {shape_b, shape_l})
    {inputs, targets}
  end

  defp loss_value(model, inputs, targets) do
    {out, _ctx} = Model.forward(model, inputs)
    {b, l, c} = Tensor.shape(out)

    {loss, nil} =
      Loss.cross_entropy(Tensor.reshape(out, {b * l, c}), Tensor.reshape(targets, {b * l}),
        ignore_index: -1,
        grad: false
      )

    hd(read(loss))
  end

  defp set_element(%Tensor{shape: shape, type: type} = t, i, v) do
    values = read(t) |> List.replace_at(i, v)
    Tensor.from_binary(encode(values, type), type, shape: shape)
  end

  test "whole-model gradients match finite differences in float64" do
    model = Model.new(@tiny ++ [seed: 3, type: {:f, 64}])
    {inputs, targets} = data(2, 5, 3, 4, {:f, 64}, 11)
    {_loss, grads} = Model.loss_and_grad(model, inputs, targets)
    assert Map.keys(grads) |> Enum.sort() == Map.keys(model.params) |> Enum.sort()
    :rand.seed(:exsss, {5, 6, 7})
    h = 1.0e-6

    for {name, p} <- Enum.sort(model.params) do
      g = read(grads[name])
      assert Tensor.shape(grads[name]) == Tensor.shape(p), name
      values = read(p)
      n = length(values)

      for i <- Enum.uniq(for _ <- 1..3, do: :rand.uniform(n) - 1) do
        v = Enum.at(values, i)
        plus = %{model | params: Map.put(model.params, name, set_element(p, i, v + h))}
        minus = %{model | params: Map.put(model.params, name, set_element(p, i, v - h))}
        fd = (loss_value(plus, inputs, targets) - loss_value(minus, inputs, targets)) / (2 * h)
        an = Enum.at(g, i)

        assert abs(fd - an) <= 1.0e-6 * max(abs(fd), 1.0e-2),
               "#{name}[#{i}]: analytic #{an}, finite difference #{fd}"
      end
    end
  end

  test "four accumulated micro-batches give the gradients of the whole batch" do
    model = Model.new(@tiny ++ [seed: 4])
    {inputs, targets} = data(8, 6, 3, 4, {:f, 32}, 12)
    {loss, whole} = Model.loss_and_grad(model, inputs, targets)

    {acc, losses} =
      Enum.reduce(0..3, {nil, []}, fn k, {acc, losses} ->
        x = Tensor.slice(inputs, 0, 2 * k, 2)
        y = Tensor.slice(targets, 0, 2 * k, 2)
        {l, g} = Model.loss_and_grad(model, x, y, scale: 0.25, into: acc)
        {g, [hd(read(l)) | losses]}
      end)

    assert_in_delta Enum.sum(losses), hd(read(loss)), 1.0e-5

    for {name, g} <- whole do
      err = rel_err(read(acc[name]), read(g))
      assert err <= 1.0e-5, "#{name}: relative error #{err}"
    end
  end

  test "training is deterministic for a seed and the loss falls" do
    run = fn ->
      model = Model.new(@tiny ++ [seed: 9])
      opt = Model.optimizer(model, lr: 1.0e-2, max_grad_norm: 1.0)
      {inputs, targets} = data(4, 7, 3, 4, {:f, 32}, 13)

      {_m, _o, losses} =
        Enum.reduce(1..30, {model, opt, []}, fn _, {m, o, ls} ->
          {m, o, loss} = Model.train_step(m, o, inputs, targets)
          {m, o, [hd(read(loss)) | ls]}
        end)

      {Enum.reverse(losses), Tensor.to_binary(model.params["layers.1.mixer.x_proj.weight"])}
    end

    {l1, p1} = run.()
    {l2, p2} = run.()
    assert l1 == l2 and p1 == p2
    assert List.last(l1) < 0.8 * hd(l1), "loss did not fall: #{inspect(l1)}"
  end

  test "save and load: training resumes exactly where it stopped; bad files are errors" do
    {inputs, targets} = data(3, 6, 3, 4, {:f, 32}, 14)
    model = Model.new(@tiny ++ [seed: 2])
    opt = Model.optimizer(model, lr: 5.0e-3, max_grad_norm: 1.0)
    steps = fn m, o, k -> Enum.reduce(1..k, {m, o, nil}, fn _, {m, o, _} -> Model.train_step(m, o, inputs, targets) end) end
    {model, opt, _} = steps.(model, opt, 3)
    path = Path.join(System.tmp_dir!(), "mambex_model_#{System.unique_integer([:positive])}.bin")
    :ok = Model.save(path, model, opt)
    {:ok, loaded, lopt} = Model.load(path)
    assert loaded.config == model.config
    for {k, v} <- model.params, do: assert(Tensor.to_binary(loaded.params[k]) == Tensor.to_binary(v), k)
    assert Mambex.AdamW.step_count(lopt) == 3

    # continuing both gives the same bits
    {m1, _, l1} = steps.(model, opt, 2)
    {m2, _, l2} = steps.(loaded, lopt, 2)
    assert read(l1) == read(l2)
    for {k, v} <- m1.params, do: assert(Tensor.to_binary(m2.params[k]) == Tensor.to_binary(v), k)

    # without an optimizer
    :ok = Model.save(path, model)
    assert {:ok, _, nil} = Model.load(path)

    # truncated and corrupted files, and files of another shape, are errors
    bin = File.read!(path)
    for cut <- [0, 10, div(byte_size(bin), 2), byte_size(bin) - 1] do
      File.write!(path, binary_part(bin, 0, cut))
      assert {:error, msg} = Model.load(path)
      assert is_binary(msg)
    end

    {:ok, tensors, numbers} = Checkpoint.decode(bin)
    bad = [
      {Map.delete(tensors, "param/head.bias"), numbers},
      {tensors, Map.put(numbers, "model.d_model", 9)},
      {tensors, Map.put(numbers, "model.d_state", 0)},
      {tensors, Map.delete(numbers, "model.eps")},
      {Map.put(tensors, "param/extra", Tensor.zeros({1})), numbers}
    ]

    for {t, n} <- bad do
      :ok = Checkpoint.write(path, t, n)
      assert {:error, _} = Model.load(path)
    end

    File.rm!(path)
  end

  # ~4 s on a 2-core machine: part of the normal suite.
  test "a small model learns Selective Copying on the CPU" do
    task = SelectiveCopying.config(length: 24, tokens: 4, vocab: 4)

    model =
      Model.new(features: SelectiveCopying.features(task), outputs: 4, d_model: 32, n_layers: 2, seed: 1)

    opt = Model.optimizer(model, lr: 1.0e-2, max_grad_norm: 1.0)
    rand = :rand.seed_s(:exsss, {1, 2, 3})

    {model, _opt, rand} =
      Enum.reduce(1..600, {model, opt, rand}, fn _, {m, o, r} ->
        {x, y, _ans, r} = SelectiveCopying.batch(task, 32, :cpu, r)
        {m, o, _loss} = Model.train_step(m, o, x, y)
        {m, o, r}
      end)

    {x, _y, answers, _} = SelectiveCopying.batch(task, 256, :cpu, rand)
    {out, _} = Model.forward(model, x)
    acc = SelectiveCopying.accuracy(task, out, answers)
    assert acc >= 0.95, "held-out token accuracy #{acc}"
  end
end

defmodule Mambex.ModelCudaTest do
  use ExUnit.Case, async: false

  alias Mambex.{Model, Tensor}
  import Mambex.TestHelpers

  @tag :cuda
  test "training on CUDA follows the CPU run" do
    dev = cuda_device()
    opts = [features: 5, outputs: 6, d_model: 16, n_layers: 2, seed: 21]
    cpu = Model.new(opts)
    # a second model from the same seed: training updates parameters in place
    src = Model.new(opts)
    gpu = %{src | params: Map.new(src.params, fn {k, v} -> {k, Tensor.to_device(v, dev)} end), device: dev}
    :rand.seed(:exsss, {1, 1, 1})
    x = for _ <- 1..(4 * 9 * 5), do: :rand.uniform() * 2 - 1
    y = for _ <- 1..(4 * 9), do: :rand.uniform(6) - 1
    xb = Tensor.from_binary(encode(x, {:f, 32}), {:f, 32}, shape: {4, 9, 5})
    yb = Tensor.from_binary(encode(y, {:s, 32}), {:s, 32}, shape: {4, 9})

    run = fn model, xs, ys ->
      opt = Model.optimizer(model, lr: 1.0e-2, max_grad_norm: 1.0)

      {_, _, losses} =
        Enum.reduce(1..10, {model, opt, []}, fn _, {m, o, ls} ->
          {m, o, l} = Model.train_step(m, o, xs, ys)
          {m, o, [l | ls]}
        end)

      losses |> Enum.reverse() |> Enum.map(&hd(read(&1)))
    end

    lc = run.(cpu, xb, yb)
    lg = run.(gpu, Tensor.to_device(xb, dev), Tensor.to_device(yb, dev))

    for {a, b} <- Enum.zip(lc, lg),
        do: assert(abs(a - b) <= 1.0e-4 * abs(a), "cpu #{inspect(lc)}\ncuda #{inspect(lg)}")

    assert List.last(lg) < hd(lg)
  end
end
