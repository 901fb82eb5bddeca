defmodule Mambex.SelectiveCopying do
  @moduledoc """
  The Selective Copying task of the Mamba paper (§4.1.1), as batches of
  device tensors.

  A sequence has `length` context steps holding `tokens` data tokens (drawn
  from `vocab` symbols) at random positions, in order, among noise steps,
  followed by `tokens` answer steps holding a marker. The model must output
  the data tokens, in order, at the answer steps.

  Inputs are one-hot `{batch, length + tokens, vocab + 2}` `{:f, 32}`
  (symbols `0..vocab-1`, then the noise symbol, then the marker); targets
  are `{batch, length + tokens}` `{:s, 32}`: the data token at each answer
  step and -1 (ignored) elsewhere.
  """

  alias Mambex.Tensor

  @type config :: %{length: pos_integer(), tokens: pos_integer(), vocab: pos_integer()}

  @doc "A task configuration: `:length` (256), `:tokens` (16), `:vocab` (16)."
  @spec config(keyword()) :: config()
  def config(opts \\ []) do
    opts = Keyword.validate!(opts, length: 256, tokens: 16, vocab: 16)

    if opts[:tokens] > opts[:length],
      do: raise(ArgumentError, "SelectiveCopying: :tokens must not exceed :length")

    Map.new(opts)
  end

  @doc "Input features per step (`vocab + 2`)."
  @spec features(config()) :: pos_integer()
  def features(%{vocab: v}), do: v + 2

  @doc """
  A batch: `{inputs, targets, answers}` where `answers` is the host list of
  each sequence's data tokens. `rand` is a `:rand` state; the new state is
  returned last.
  """
  @spec batch(config(), pos_integer(), Tensor.device(), :rand.state()) ::
          {Tensor.t(), Tensor.t(), [[non_neg_integer()]], :rand.state()}
  def batch(%{length: len, tokens: k, vocab: v} = cfg, batch_size, device, rand) do
    f = features(cfg)
    onehot = for s <- 0..(f - 1), into: %{}, do: {s, one_hot(s, f)}

    {seqs, rand} =
      Enum.map_reduce(1..batch_size, rand, fn _, st ->
        {positions, st} = positions(len, k, st)
        {data, st} = Enum.map_reduce(1..k, st, fn _, st -> :rand.uniform_s(v, st) end)
        data = Enum.map(data, &(&1 - 1))
        {{positions, data}, st}
      end)

    inputs =
      for {positions, data} <- seqs do
        placed = Map.new(Enum.zip(positions, data))
        context = for t <- 0..(len - 1), do: onehot[Map.get(placed, t, v)]
        [context, List.duplicate(onehot[v + 1], k)]
      end

    targets =
      for {_positions, data} <- seqs do
        [List.duplicate(<<-1::signed-32-native>>, len), for(d <- data, do: <<d::signed-32-native>>)]
      end

    x = Tensor.from_binary(IO.iodata_to_binary(inputs), {:f, 32}, shape: {batch_size, len + k, f}, device: device)
    y = Tensor.from_binary(IO.iodata_to_binary(targets), {:s, 32}, shape: {batch_size, len + k}, device: device)
    {x, y, Enum.map(seqs, &elem(&1, 1)), rand}
  end

  defp one_hot(s, f), do: for(i <- 0..(f - 1), into: <<>>, do: <<if(i == s, do: 1.0, else: 0.0)::float-32-native>>)

  # k distinct sorted positions in 0..len-1.
  defp positions(len, k, st) do
    {set, st} =
      Enum.reduce_while(Stream.cycle([:x]), {MapSet.new(), st}, fn _, {set, st} ->
        if MapSet.size(set) == k do
          {:halt, {set, st}}
        else
          {p, st} = :rand.uniform_s(len, st)
          {:cont, {MapSet.put(set, p - 1), st}}
        end
      end)

    {Enum.sort(set), st}
  end

  @doc """
  Token accuracy of model outputs `{batch, length + tokens, vocab}` at the
  answer steps against `answers` (reads the outputs: waits for the device).
  """
  @spec accuracy(config(), Tensor.t(), [[non_neg_integer()]]) :: float()
  def accuracy(%{length: len, tokens: k}, outputs, answers) do
    {b, _, c} = Tensor.shape(outputs)
    last = Tensor.slice(outputs, 1, len, k)
    values = Tensor.to_flat_list(last)

    preds =
      values
      |> Enum.chunk_every(c)
      |> Enum.map(fn row -> row |> Enum.with_index() |> Enum.max_by(&elem(&1, 0)) |> elem(1) end)

    correct =
      preds
      |> Enum.zip(List.flatten(answers))
      |> Enum.count(fn {p, a} -> p == a end)

    correct / (b * k)
  end
end
