/**
 * Command-line number parsing: exact values. Acceptance and rejection were checked against qemu-storage-daemon
 * in qapi-cmdline.test.ts; the size values here are checked against it against it unless BLK_QAPI_QEMU=0 (a vhost-user-blk
 * export reports the logical block size it parsed when that size is not a power of two).
 */
import { missingPeers, run } from "@blk/testkit";
import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { parseBool, parseInt64, parseNumber, parseSize, parseUint64 } from "../src/index.ts";

const RUNS = Number(process.env.BLK_FUZZ_RUNS ?? 300);

const SIZES: readonly (readonly [string, number | undefined])[] = [
  ["0", 0],
  ["513", 513],
  ["1b", 1],
  ["1B", 1],
  ["1k", 1024],
  ["1K", 1024],
  ["1.5k", 1536],
  ["1.2k", 1229],
  ["0.3k", 307],
  ["0.5k", 512],
  ["1.k", 1024],
  ["1.0", 1],
  ["1.0b", 1],
  ["1M", 1048576],
  ["1.5M", 1572864],
  ["1g", 2 ** 30],
  ["1T", 2 ** 40],
  ["1P", 2 ** 50],
  ["1e", 2 ** 60],
  ["15.5E", 15.5 * 2 ** 60],
  ["1.5e", 1.5 * 2 ** 60],
  ["0x200", 512],
  ["0x1k", 1024],
  ["0X10", 16],
  [" 1k", 1024],
  ["+5", 5],
  ["08", 8],
  ["010", 10],
  ["18446744073709551615", 2 ** 64],
  ["1kb", undefined],
  ["16E", undefined],
  ["-1", undefined],
  ["-0", undefined],
  ["k", undefined],
  ["", undefined],
  [".5k", undefined],
  ["1.5", undefined],
  ["1.5b", undefined],
  ["1.5e3k", undefined],
  ["0x1.5k", undefined],
  ["0x", undefined],
  ["18446744073709551616", undefined],
  ["1 k", undefined],
  ["1k ", undefined],
];

const INT64: readonly (readonly [string, number | undefined])[] = [
  ["0", 0],
  ["-5", -5],
  ["+5", 5],
  [" 5", 5],
  ["\t5", 5],
  ["0x10", 16],
  ["0X1f", 31],
  ["-0x10", -16],
  ["010", 8],
  ["9223372036854775807", 2 ** 63],
  ["-9223372036854775808", -(2 ** 63)],
  ["9223372036854775808", undefined],
  ["5 ", undefined],
  ["08", undefined],
  ["0x", undefined],
  ["", undefined],
  ["-", undefined],
  ["1e3", undefined],
  ["1.0", undefined],
  ["1k", undefined],
];

const UINT64: readonly (readonly [string, number | undefined])[] = [
  ["0", 0],
  ["18446744073709551615", 2 ** 64],
  ["-1", 2 ** 64],
  ["-18446744073709551615", 1],
  ["18446744073709551616", undefined],
  ["0x10", 16],
  ["x", undefined],
];

const NUMBERS: readonly (readonly [string, number | undefined])[] = [
  ["1", 1],
  ["-1.5", -1.5],
  [".5", 0.5],
  ["5.", 5],
  ["1e3", 1000],
  ["1E-3", 0.001],
  [" 2", 2],
  ["1e999", undefined],
  ["inf", undefined],
  ["nan", undefined],
  ["", undefined],
  ["1x", undefined],
  ["2 ", undefined],
];

describe("command-line numbers", () => {
  it.each(SIZES)("size %j → %s", (s, v) => {
    expect(parseSize(s)).toBe(v);
  });
  it.each(INT64)("int64 %j → %s", (s, v) => {
    expect(parseInt64(s)).toBe(v);
  });
  it.each(UINT64)("uint64 %j → %s", (s, v) => {
    expect(parseUint64(s)).toBe(v);
  });
  it.each(NUMBERS)("number %j → %s", (s, v) => {
    expect(parseNumber(s)).toBe(v);
  });
  it("bool words", () => {
    expect(["on", "yes", "true", "y"].map(parseBool)).toEqual([true, true, true, true]);
    expect(["off", "no", "false", "n"].map(parseBool)).toEqual([false, false, false, false]);
    expect(["On", "1", "0", "", " on"].map(parseBool)).toEqual([
      undefined,
      undefined,
      undefined,
      undefined,
      undefined,
    ]);
  });

  it("decimal integers and sizes agree with BigInt arithmetic", () => {
    fc.assert(
      fc.property(
        fc.bigInt({ min: 0n, max: (1n << 53n) - 1n }),
        fc.constantFrom(["", 0n], ["k", 10n], ["M", 20n]),
        (n, [suffix, shift]) => {
          const expected = n << shift;
          const got = parseSize(`${n}${suffix}`);
          if (expected >= 1n << 64n) expect(got).toBeUndefined();
          else expect(got).toBe(Number(expected));
          expect(parseInt64(String(n))).toBe(Number(n));
          expect(parseInt64(`0x${n.toString(16)}`)).toBe(Number(n));
          expect(parseInt64(`0${n.toString(8)}`)).toBe(Number(n));
        },
      ),
      { numRuns: RUNS },
    );
  });
});

const live = process.env.BLK_QAPI_QEMU !== "0" && missingPeers(["qemu-storage-daemon"]).length === 0;

describe.skipIf(!live)("size values against the real qemu-storage-daemon", { tags: ["qemu"] }, () => {
  it("parses to the same byte counts", async () => {
    const rows = SIZES.filter(
      ([, v]) => v !== undefined && v > 0 && v < 2 ** 31 && (v < 512 || v > 2097152 || (v & (v - 1)) !== 0),
    );
    for (const [s, v] of rows) {
      const r = await run(
        "qemu-storage-daemon",
        [
          "--blockdev",
          "null-co,node-name=n",
          "--export",
          `type=vduse-blk,id=e,node-name=n,name=x,logical-block-size=${s}`,
        ],
        { timeoutMs: 10_000 },
      );
      const m = /doesn't take value '?(\d+)/.exec(r.stderr);
      expect(m?.[1], `${s}: ${r.stderr}`).toBe(String(v));
    }
  });
});
