defmodule Mambex.RandomTest do
  @moduledoc """
  random_uniform / random_normal: determinism per seed, independence of the
  shape, the documented range, the generator itself (re-implemented here),
  and the moments of the normal distribution.
  """
  use ExUnit.Case, async: true

  import Mambex.TestHelpers
  alias Mambex.Tensor

  setup context, do: seed_rand(context)

  defp seed, do: :rand.uniform(2 ** 40)

  defp mean_std(xs) do
    n = length(xs)
    m = Enum.sum(xs) / n
    v = Enum.reduce(xs, 0.0, fn x, acc -> acc + (x - m) * (x - m) end) / (n - 1)
    {m, :math.sqrt(v)}
  end

  for {label, device, tags} <- device_matrix() do
    describe "on #{label}" do
      @describetag tags
      @describetag device: device

      test "the same seed gives the same values, different seeds different ones",
           %{device: device} do
        s = seed()

        for type <- all_types() do
          u1 =
            Tensor.random_uniform({33, 7}, seed: s, type: type, device: device, min: 0, max: 100)

          u2 =
            Tensor.random_uniform({33, 7}, seed: s, type: type, device: device, min: 0, max: 100)

          u3 =
            Tensor.random_uniform({33, 7},
              seed: s + 1,
              type: type,
              device: device,
              min: 0,
              max: 100
            )

          assert %Tensor{shape: {33, 7}, type: ^type, device: ^device} = u1
          assert Tensor.to_binary(u1) == Tensor.to_binary(u2)
          assert Tensor.to_binary(u1) != Tensor.to_binary(u3)
          # not a constant
          assert length(Enum.uniq(read(u1))) > 10
        end

        for type <- float_types() do
          n1 = Tensor.random_normal({231}, seed: s, type: type, device: device)
          n2 = Tensor.random_normal({231}, seed: s, type: type, device: device)
          n3 = Tensor.random_normal({231}, seed: s + 1, type: type, device: device)
          assert Tensor.to_binary(n1) == Tensor.to_binary(n2)
          assert Tensor.to_binary(n1) != Tensor.to_binary(n3)
          assert length(Enum.uniq(read(n1))) > 50
        end
      end

      test "element i depends only on the seed and i, not on the shape", %{device: device} do
        s = seed()

        for type <- [{:f, 32}, {:f, 64}, {:s, 32}] do
          long =
            read(
              Tensor.random_uniform({10}, seed: s, type: type, device: device, min: -5, max: 5)
            )

          short =
            read(Tensor.random_uniform({5}, seed: s, type: type, device: device, min: -5, max: 5))

          matrix =
            read(
              Tensor.random_uniform({2, 5}, seed: s, type: type, device: device, min: -5, max: 5)
            )

          assert Enum.take(long, 5) == short
          assert matrix == long
        end

        long = read(Tensor.random_normal({10}, seed: s, device: device))
        assert Enum.take(long, 4) == read(Tensor.random_normal({2, 2}, seed: s, device: device))
      end

      test "uniform f64 samples are exactly the documented generator", %{device: device} do
        s = seed()

        for {min, max} <- [{0.0, 1.0}, {-3.0, 5.0}, {2.5, 2.75}] do
          out =
            read(
              Tensor.random_uniform({257},
                seed: s,
                type: {:f, 64},
                device: device,
                min: min,
                max: max
              )
            )

          ref = for k <- 0..256, do: min + (max - min) * rand_unit(s, k)

          if device == :cpu do
            assert out == ref
          else
            # a device may fuse the multiply-add
            assert_matches(out, ref, {:f, 64}, :elementwise, "uniform f64")
          end
        end

        for top <- [0, 2 ** 64 - 1] do
          out = read(Tensor.random_uniform({3}, seed: top, type: {:f, 64}, device: device))

          assert_matches(
            out,
            for(k <- 0..2, do: rand_unit(top, k)),
            {:f, 64},
            :elementwise,
            "seed #{top}"
          )
        end
      end

      test "normal f64 samples follow the documented Box-Muller transform", %{device: device} do
        s = seed()

        out =
          read(
            Tensor.random_normal({101},
              seed: s,
              type: {:f, 64},
              device: device,
              mean: 1.0,
              std: 2.0
            )
          )

        ref =
          for i <- 0..100 do
            u1 = 1.0 - rand_unit(s, 2 * i)
            u2 = rand_unit(s, 2 * i + 1)
            1.0 + 2.0 * (:math.sqrt(-2.0 * :math.log(u1)) * :math.cos(2 * :math.pi() * u2))
          end

        assert_matches(out, ref, {:f, 64}, :elementwise, "normal f64")
      end

      for type <- [{:f, 32}, {:f, 64}, {:bf, 16}, {:f, 16}, {:s, 32}, {:s, 64}, {:u, 8}] do
        @tag type: type
        test "uniform #{inspect(type)} samples lie in [min, max)", %{device: device, type: type} do
          ranges =
            if float?(type),
              do: [{0.0, 1.0}, {-3.0, 5.0}, {2.5, 2.75}, {-1.0, 0.0}],
              else: [{0, 10}, {3, 200}, {0, 256}, {17, 18}]

          for {min, max} <- ranges do
            out =
              read(
                Tensor.random_uniform({20_000},
                  seed: seed(),
                  type: type,
                  device: device,
                  min: min,
                  max: max
                )
              )

            bad = Enum.reject(out, &(is_number(&1) and &1 >= min and &1 < max))

            assert bad == [],
                   "#{length(bad)} of 20000 samples outside [#{min}, #{max}): #{inspect(Enum.take(Enum.uniq(bad), 5))}"

            if float?(type) do
              # the range is covered: something in each of the lower and upper quarters
              q = (max - min) / 4
              assert Enum.any?(out, &(&1 < min + q)) and Enum.any?(out, &(&1 >= max - q))
            else
              assert Enum.all?(out, &is_integer/1)
              assert Enum.min(out) == min and Enum.max(out) == max - 1
            end
          end
        end
      end

      test "normal samples have the requested mean and standard deviation", %{device: device} do
        for {type, n} <- [
              {{:f, 32}, 100_000},
              {{:f, 64}, 100_000},
              {{:bf, 16}, 30_000},
              {{:f, 16}, 30_000}
            ],
            {mean, std} <- [{0.0, 1.0}, {2.0, 3.0}] do
          out =
            read(
              Tensor.random_normal({n},
                seed: seed(),
                type: type,
                device: device,
                mean: mean,
                std: std
              )
            )

          assert Enum.all?(out, &is_number/1)
          {m, s} = mean_std(out)
          # 6 standard errors (and bf16's rounding) of slack
          se = std / :math.sqrt(n)

          assert abs(m - mean) < 6 * se + 0.01 * std,
                 "#{inspect(type)} mean #{m}, expected #{mean}"

          assert abs(s - std) < 6 * std / :math.sqrt(2 * n) + 0.01 * std,
                 "#{inspect(type)} std #{s}, expected #{std}"

          # roughly 68% within one standard deviation
          within = Enum.count(out, &(abs(&1 - mean) < std)) / n
          assert abs(within - 0.6827) < 0.02
        end
      end

      test "normal with std 0 is the mean; uniform with min == max is min", %{device: device} do
        assert read(Tensor.random_normal({5}, seed: 1, device: device, mean: 1.5, std: 0)) ==
                 List.duplicate(1.5, 5)

        assert read(Tensor.random_uniform({5}, seed: 1, device: device, min: 2.5, max: 2.5)) ==
                 List.duplicate(2.5, 5)
      end

      test "random tensors of zero size and rank 0", %{device: device} do
        assert read(Tensor.random_uniform({3, 0}, seed: 1, device: device)) == []
        assert Tensor.random_normal({0}, seed: 1, device: device).shape == {0}
        [x] = read(Tensor.random_uniform({}, seed: 1, device: device))
        assert x >= 0.0 and x < 1.0
      end
    end
  end
end
