/**
 * Differential test against the real qemu-img (7.2 with block-gluster.so): every conformance vector and a
 * batch of mutated URLs go through `qemu-img info` and through this parser, and the printed outcome must be
 * the same: warnings, message, hint lines. Nothing listens on the gluster ports, so a successful parse shows
 * up as QEMU's connection error, which prints the parsed fields. Skipped, with the reason logged, when
 * qemu-img or its gluster module is missing.
 */
import { missingPeers, PeerTimeoutError, run } from "@blk/testkit";
import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { GlusterError, parseGlusterOptions, resolveGlusterConnection } from "../src/gluster/index.ts";
import { JSON_EXTRA_VECTORS, JSON_VECTORS, URI_EXTRA_VECTORS, URI_VECTORS } from "./gluster-vectors.ts";

interface Outcome {
  warnings: string[];
  message: string;
  hints: string[];
}

/** Runs `qemu-img info <input>`; undefined when it did not finish in time. */
async function qemu(input: string): Promise<Outcome | undefined> {
  let r: Awaited<ReturnType<typeof run>>;
  try {
    r = await run("qemu-img", ["info", input], { timeoutMs: 10_000 });
  } catch (e) {
    if (e instanceof PeerTimeoutError) return undefined;
    throw e;
  }
  const lines = r.stderr.split("\n").filter((l) => l !== "");
  const warnings: string[] = [];
  while (lines[0]?.startsWith("qemu-img: warning: ")) warnings.push(lines.shift()?.slice(19) ?? "");
  const first = lines.shift() ?? "";
  const prefix = `qemu-img: Could not open '${input}': `;
  return {
    warnings,
    message: first.startsWith(prefix) ? first.slice(prefix.length) : `UNEXPECTED ${first}`,
    hints: lines,
  };
}

/** What qemu-img would print for `input`, computed by this package. */
function ours(input: string): Outcome {
  const warnings: string[] = [];
  try {
    const o = parseGlusterOptions(input, { onWarning: (w) => warnings.push(w) });
    let filename: string | undefined = input;
    if (input.startsWith("json:")) {
      const j: unknown = JSON.parse(input.slice(5));
      const f = typeof j === "object" && j !== null && "filename" in j ? j.filename : undefined;
      filename = typeof f === "string" ? f : undefined;
    }
    resolveGlusterConnection(o, filename);
    const hint = o.server
      .map((s) =>
        s.type === "inet"
          ? `hint: failed on host ${s.host} and port ${s.port} `
          : `hint: failed on socket ${s.path} `,
      )
      .join("");
    return {
      warnings,
      message: `Gluster connection for volume ${o.volume}, path ${o.path} failed to connect`,
      hints: [`${hint}Please refer to gluster logs for more info`],
    };
  } catch (e) {
    if (!(e instanceof GlusterError)) throw e;
    return { warnings, message: e.message, hints: e.hint === undefined ? [] : e.hint.split("\n") };
  }
}

async function whySkip(): Promise<string | undefined> {
  if (missingPeers(["qemu-img"]).length > 0) return "qemu-img is not installed";
  const probe = await run("qemu-img", ["info", "gluster://127.0.0.1/testvol/a.img"], { timeoutMs: 10_000 });
  return probe.stderr.includes("Gluster connection")
    ? undefined
    : `qemu-img has no gluster support (${probe.stderr.trim()})`;
}
const skipReason = await whySkip();
if (skipReason !== undefined) console.warn(`gluster.qemu.test.ts skipped: ${skipReason}`);

// Needs only qemu-img with its gluster module (~3 s) and skips itself when that is missing.
describe.skipIf(skipReason !== undefined)("gluster parser vs qemu-img", { tags: ["qemu"] }, () => {
  const inputs = [
    ...[...URI_VECTORS, ...URI_EXTRA_VECTORS].map((v) => [v.id, v.input] as const),
    ...[...JSON_VECTORS, ...JSON_EXTRA_VECTORS].map((v) => [v.id, `json:${v.input}`] as const),
  ].filter(([, input]) => input !== "" && !/^[^:/]*\//.test(input) && !input.startsWith("/"));

  it.each(inputs)("vector %s prints what qemu-img prints", async (_, input) => {
    const q = await qemu(input);
    if (q === undefined) return; // qemu-img timed out: inconclusive
    expect(ours(input)).toEqual(q);
  });

  it("mutated URLs print what qemu-img prints", async () => {
    const tokens = [
      ..."/:@[]%?#&;=+._~!$'(),09aAfgsx ",
      "%2F",
      "%00",
      "%25",
      "%3A",
      "%20",
      "[::1]",
      "socket=",
      ":0",
      "//",
    ];
    const bases = [...URI_VECTORS, ...URI_EXTRA_VECTORS]
      .map((v) => v.input)
      .filter((s) => s.startsWith("gluster"));
    const mutated = fc
      .tuple(
        fc.constantFrom(...bases),
        fc.array(fc.tuple(fc.constantFrom(0, 1, 2), fc.nat(), fc.constantFrom(...tokens)), {
          minLength: 1,
          maxLength: 4,
        }),
      )
      .map(([base, ms]) => {
        let s = base;
        for (const [op, n, t] of ms) {
          const at = n % (s.length + 1);
          s = s.slice(0, at) + (op === 2 ? "" : t) + s.slice(op === 0 ? at : at + 1);
        }
        return s;
      })
      // qemu-img opens strings without a protocol prefix as files; raw non-ASCII bytes are a documented deviation
      .filter((s) => /^[^:/]+:/.test(s) && !s.startsWith("json:") && !/%[89a-fA-F][0-9a-fA-F]/.test(s));
    await fc.assert(
      fc.asyncProperty(mutated, async (input) => {
        const q = await qemu(input);
        if (q !== undefined) expect(ours(input)).toEqual(q);
      }),
      {
        numRuns: Number(process.env.BLK_FUZZ_RUNS ?? 50),
        seed: Number(process.env.BLK_FUZZ_SEED ?? 7_2_22),
      },
    );
  }, 120_000);

  it("random JSON options print what qemu-img prints", async () => {
    const text = fc.oneof(
      fc.constantFrom(
        "",
        "h",
        "::1",
        "[::1]",
        "a/b",
        "a b",
        "24007",
        "0",
        "+5",
        " 1",
        "-1",
        "0x10",
        "on",
        "y",
        "inet",
        "unix",
        "tcp",
      ),
      fc.string({ maxLength: 6, unit: fc.constantFrom(..."ab/:%+- 019") }),
    );
    const scalar = fc.oneof(
      text,
      fc.integer({ min: -5, max: 70_000 }),
      fc.double({ noNaN: true, noDefaultInfinity: true }),
      fc.boolean(),
      fc.constantFrom(null, {}, []),
    );
    const server = fc.oneof(
      fc.record(
        {
          type: fc.oneof(fc.constantFrom("inet", "tcp", "unix", "INET", "vsock"), scalar),
          host: scalar,
          port: scalar,
          path: scalar,
          socket: scalar,
          to: scalar,
          ipv4: scalar,
          ipv6: scalar,
        },
        { requiredKeys: [] },
      ),
      scalar,
    );
    // No `logfile`: libgfapi creates that file, which is I/O and out of scope.
    const options = fc.record(
      {
        driver: fc.constant("gluster"),
        volume: scalar,
        path: scalar,
        server: fc.oneof(
          fc.array(server, { maxLength: 3 }),
          fc.dictionary(fc.constantFrom("0", "1", "01", "x"), server, { maxKeys: 3 }),
          scalar,
        ),
        debug: scalar,
        filename: fc.constantFrom("gluster://h/v/a", "gluster+unix:///v/a?socket", "x", "/v/a"),
      },
      { requiredKeys: ["driver"] },
    );
    await fc.assert(
      fc.asyncProperty(options, async (o) => {
        const input = `json:${JSON.stringify(o)}`;
        const q = await qemu(input);
        if (q !== undefined) expect(ours(input)).toEqual(q);
      }),
      {
        numRuns: Number(process.env.BLK_FUZZ_RUNS ?? 30),
        seed: Number(process.env.BLK_FUZZ_SEED ?? 7_2_22),
      },
    );
  }, 120_000);
});
