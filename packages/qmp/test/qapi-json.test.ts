/**
 * QMP (JSON visitor) validation against qemu-storage-daemon 7.2.22: every row's message was answered by the real
 * daemon (transcripts §2, §3, §6, §8 and direct probes); unless BLK_QAPI_QEMU=0, replays the table against it.
 */
import { missingPeers, run } from "@blk/testkit";
import { describe, expect, it } from "vitest";
import {
  BlockDirtyBitmapOrStr,
  BlockdevOptions,
  type Infer,
  isQmpError,
  NbdServerStartArguments,
  type QapiType,
  q,
} from "../src/index.ts";

const MirrorSyncMode = q.enum(["top", "full", "none", "incremental", "bitmap"], { name: "MirrorSyncMode" });
const COMMANDS: Record<string, QapiType<unknown>> = {
  "blockdev-add": BlockdevOptions,
  "block-job-set-speed": q.object({ device: q.str(), speed: q.int() }),
  "block-job-cancel": q.object({ device: q.str(), force: q.optional(q.bool(), false) }),
  "blockdev-backup": q.object({
    "job-id": q.optional(q.str()),
    device: q.str(),
    target: q.str(),
    sync: MirrorSyncMode,
    speed: q.optional(q.int(), 0),
  }),
  "blockdev-mirror": q.object({
    "job-id": q.optional(q.str()),
    device: q.str(),
    target: q.str(),
    sync: MirrorSyncMode,
    speed: q.optional(q.int(), 0),
    granularity: q.optional(q.uint32()),
    "buf-size": q.optional(q.int()),
  }),
  "query-jobs": q.object({}),
  qmp_capabilities: q.object({ enable: q.optional(q.list(q.enum(["oob"], { name: "QMPCapability" }))) }),
  transaction: q.object({
    actions: q.list(q.any()),
    properties: q.optional(
      q.object({
        "completion-mode": q.optional(q.enum(["individual", "grouped"], { name: "ActionCompletionMode" })),
      }),
    ),
  }),
  "block-dirty-bitmap-add": q.object({
    node: q.str(),
    name: q.str(),
    granularity: q.optional(q.uint32()),
    persistent: q.optional(q.bool(), false),
    disabled: q.optional(q.bool(), false),
  }),
  "block-dirty-bitmap-merge": q.object({
    node: q.str(),
    target: q.str(),
    bitmaps: q.list(BlockDirtyBitmapOrStr),
  }),
  "blockdev-create": q.object({
    "job-id": q.str(),
    options: q.union({
      base: q.object({ driver: q.enum(["file"]) }),
      discriminator: "driver",
      variants: { file: q.object({ filename: q.str(), size: q.size() }) },
    }),
  }),
  "nbd-server-start": NbdServerStartArguments,
};

const BD = { driver: "blkdebug", "node-name": "x", image: "f" };
const NBD = { driver: "nbd", "node-name": "x" };
const Q2 = { driver: "qcow2", "node-name": "x", file: "f" };
const NULL = { driver: "null-co", "node-name": "x" };

/** JSON text with bigints written as plain integers (as QMP's reader delivers integers beyond 2^53). */
const toJsonText = (v: unknown): string =>
  JSON.stringify(v, (_, x: unknown) => (typeof x === "bigint" ? `__big:${String(x)}` : x)).replace(
    /"__big:(-?\d+)"/g,
    "$1",
  );

/** [command, arguments, QEMU's desc] */
const ERRORS: readonly (readonly [string, Record<string, unknown>, string])[] = [
  // transcripts §8
  [
    "block-job-set-speed",
    { device: "j", speed: "fast" },
    "Invalid parameter type for 'speed', expected: integer",
  ],
  [
    "block-job-cancel",
    { device: "j", force: "yes" },
    "Invalid parameter type for 'force', expected: boolean",
  ],
  ["block-job-cancel", { device: 7 }, "Invalid parameter type for 'device', expected: string"],
  [
    "blockdev-backup",
    { device: "a", target: "b", sync: "bogus" },
    "Parameter 'sync' does not accept value 'bogus'",
  ],
  ["blockdev-add", { driver: "qcow2", "node-name": "a" }, "Parameter 'file' is missing"],
  [
    "blockdev-add",
    { driver: "nosuch", "node-name": "x" },
    "Parameter 'driver' does not accept value 'nosuch'",
  ],
  [
    "blockdev-add",
    { driver: "file", "node-name": "x", filename: "/tmp/a.qcow2", cache: { direct: "on" } },
    "Invalid parameter type for 'cache.direct', expected: boolean",
  ],
  ["query-jobs", { unexpected: true }, "Parameter 'unexpected' is unexpected"],
  // transcripts §2, §3, §6
  ["blockdev-mirror", { device: "a", target: "b" }, "Parameter 'sync' is missing"],
  [
    "blockdev-mirror",
    { device: "a", target: "b", sync: "full", bogus: 1 },
    "Parameter 'bogus' is unexpected",
  ],
  [
    "transaction",
    { actions: [], properties: { "completion-mode": "bogus" } },
    "Parameter 'completion-mode' does not accept value 'bogus'",
  ],
  [
    "blockdev-add",
    { driver: "throttle", "node-name": "thr3", file: "a" },
    "Parameter 'throttle-group' is missing",
  ],
  ["qmp_capabilities", { enable: ["oob", "bogus"] }, "Parameter 'null' does not accept value 'bogus'"],
  // integers
  [
    "block-job-set-speed",
    { device: "j", speed: 1.5 },
    "Invalid parameter type for 'speed', expected: integer",
  ],
  [
    "block-job-set-speed",
    { device: "j", speed: "1" },
    "Invalid parameter type for 'speed', expected: integer",
  ],
  [
    "block-job-set-speed",
    { device: "j", speed: null },
    "Invalid parameter type for 'speed', expected: integer",
  ],
  [
    "block-job-set-speed",
    { device: "j", speed: [] },
    "Invalid parameter type for 'speed', expected: integer",
  ],
  [
    "block-job-set-speed",
    { device: "j", speed: {} },
    "Invalid parameter type for 'speed', expected: integer",
  ],
  [
    "block-job-set-speed",
    { device: "j", speed: 2 ** 63 }, // the JSON text 9223372036854775808
    "Invalid parameter type for 'speed', expected: integer",
  ],
  [
    "block-dirty-bitmap-add",
    { node: "j", name: "b", granularity: "x" },
    "Parameter 'granularity' expects uint64",
  ],
  [
    "block-dirty-bitmap-add",
    { node: "j", name: "b", granularity: 1.5 },
    "Parameter 'granularity' expects uint64",
  ],
  [
    "block-dirty-bitmap-add",
    { node: "j", name: "b", granularity: -1 },
    "Parameter 'granularity' expects uint32_t",
  ],
  [
    "block-dirty-bitmap-add",
    { node: "j", name: "b", granularity: 4294967296 },
    "Parameter 'granularity' expects uint32_t",
  ],
  [
    "blockdev-create",
    { "job-id": "c", options: { driver: "file", filename: "/nonexist/x", size: "1k" } },
    "Parameter 'options.size' expects uint64",
  ],
  [
    "blockdev-create",
    { "job-id": "c", options: { driver: "file", filename: "/nonexist/x", size: 1.5 } },
    "Parameter 'options.size' expects uint64",
  ],
  [
    "blockdev-add",
    { driver: "raw", "node-name": "x", file: { ...BD, "node-name": "y", "max-transfer": 4294967296 } },
    "Parameter 'max-transfer' expects int32_t",
  ],
  // lists and alternates
  [
    "block-dirty-bitmap-merge",
    { node: "j", target: "b", bitmaps: [1] },
    "Invalid parameter type for 'null', expected: BlockDirtyBitmapOrStr",
  ],
  [
    "block-dirty-bitmap-merge",
    { node: "j", target: "b", bitmaps: ["a", 1] },
    "Invalid parameter type for 'null', expected: BlockDirtyBitmapOrStr",
  ],
  [
    "block-dirty-bitmap-merge",
    { node: "j", target: "b", bitmaps: [{ node: "a" }] },
    "Parameter 'bitmaps[0].name' is missing",
  ],
  [
    "block-dirty-bitmap-merge",
    { node: "j", target: "b", bitmaps: ["a", { node: "a", name: 1 }] },
    "Invalid parameter type for 'bitmaps[1].name', expected: string",
  ],
  [
    "block-dirty-bitmap-merge",
    { node: "j", target: "b", bitmaps: "a" },
    "Invalid parameter type for 'bitmaps', expected: array",
  ],
  [
    "block-dirty-bitmap-merge",
    { node: "j", target: "b", bitmaps: ["a", { node: "a", name: "x", z: 1 }] },
    "Parameter 'bitmaps[1].z' is unexpected",
  ],
  // BlockdevOptions in depth
  ["blockdev-add", { ...NBD, server: { type: "bogus" } }, "Parameter 'type' does not accept value 'bogus'"],
  ["blockdev-add", { ...NBD, server: { type: "inet", host: "h" } }, "Parameter 'server.port' is missing"],
  [
    "blockdev-add",
    { ...NBD, server: { type: "inet", host: "h", port: 1 } },
    "Invalid parameter type for 'server.port', expected: string",
  ],
  ["blockdev-add", { ...NBD, server: { host: "h", port: "1" } }, "Parameter 'server.type' is missing"],
  ["blockdev-add", { ...NBD, server: "a" }, "Invalid parameter type for 'server', expected: object"],
  [
    "blockdev-add",
    { driver: "qcow2", "node-name": "x", file: 1 },
    "Invalid parameter type for 'file', expected: BlockdevRef",
  ],
  [
    "blockdev-add",
    { driver: "qcow2", "node-name": "x", file: { driver: "nosuch" } },
    "Parameter 'driver' does not accept value 'nosuch'",
  ],
  [
    "blockdev-add",
    { driver: "qcow2", "node-name": "x", file: { driver: "file", filename: "/x", aio: "bogus" } },
    "Parameter 'aio' does not accept value 'bogus'",
  ],
  [
    "blockdev-add",
    { driver: "qcow2", "node-name": "x", file: { driver: "file" } },
    "Parameter 'file.filename' is missing",
  ],
  [
    "blockdev-add",
    { driver: "qcow2", "node-name": "x", file: { driver: "file", filename: "/x", bogus: 1 } },
    "Parameter 'file.bogus' is unexpected",
  ],
  [
    "blockdev-add",
    { driver: "qcow2", "node-name": "x", file: "f", backing: 1 },
    "Invalid parameter type for 'backing', expected: BlockdevRefOrNull",
  ],
  [
    "blockdev-add",
    { driver: "qcow2", "node-name": "x", file: "f", backing: true },
    "Invalid parameter type for 'backing', expected: BlockdevRefOrNull",
  ],
  ["blockdev-add", { driver: 1, "node-name": "x" }, "Invalid parameter type for 'driver', expected: string"],
  ["blockdev-add", { "node-name": "x" }, "Parameter 'driver' is missing"],
  [
    "blockdev-add",
    { driver: "null-co", "node-name": "x", cache: 1 },
    "Invalid parameter type for 'cache', expected: object",
  ],
  [
    "blockdev-add",
    { driver: "null-co", "node-name": "x", cache: { direct: true, x: 1 } },
    "Parameter 'cache.x' is unexpected",
  ],
  [
    "blockdev-add",
    { driver: "null-co", "node-name": "x", "detect-zeroes": 1 },
    "Invalid parameter type for 'detect-zeroes', expected: string",
  ],
  [
    "blockdev-add",
    { driver: "null-co", "node-name": "x", "read-only": "on" },
    "Invalid parameter type for 'read-only', expected: boolean",
  ],
  [
    "blockdev-add",
    { driver: "null-co", "node-name": "x", "read-only": null },
    "Invalid parameter type for 'read-only', expected: boolean",
  ],
  [
    "blockdev-add",
    { ...BD, "inject-error": [{ event: "bogus" }] },
    "Parameter 'event' does not accept value 'bogus'",
  ],
  [
    "blockdev-add",
    { ...BD, "inject-error": [{ event: "read_aio", errno: "x" }] },
    "Invalid parameter type for 'inject-error[0].errno', expected: integer",
  ],
  [
    "blockdev-add",
    { ...BD, "inject-error": [{ event: "read_aio" }, { event: "read_aio", errno: "x" }] },
    "Invalid parameter type for 'inject-error[1].errno', expected: integer",
  ],
  [
    "blockdev-add",
    { ...BD, "inject-error": [{ event: "read_aio" }, {}] },
    "Parameter 'inject-error[1].event' is missing",
  ],
  [
    "blockdev-add",
    { ...BD, "inject-error": [1] },
    "Invalid parameter type for 'inject-error[0]', expected: object",
  ],
  [
    "blockdev-add",
    { ...BD, "inject-error": {} },
    "Invalid parameter type for 'inject-error', expected: array",
  ],
  [
    "blockdev-add",
    { ...BD, "inject-error": [{ event: "read_aio", x: 1 }] },
    "Parameter 'inject-error[0].x' is unexpected",
  ],
  // alternates with an enum branch, unions inside drivers, sized integers, lists of enums, 64-bit extremes
  [
    "blockdev-add",
    { ...Q2, "overlap-check": 1 },
    "Invalid parameter type for 'overlap-check', expected: Qcow2OverlapChecks",
  ],
  [
    "blockdev-add",
    { ...Q2, "overlap-check": "bogus" },
    "Parameter 'overlap-check' does not accept value 'bogus'",
  ],
  [
    "blockdev-add",
    { ...Q2, "overlap-check": { template: 1 } },
    "Invalid parameter type for 'overlap-check.template', expected: string",
  ],
  ["blockdev-add", { ...Q2, encrypt: { format: "aes", x: 1 } }, "Parameter 'encrypt.x' is unexpected"],
  ["blockdev-add", { ...Q2, encrypt: "aes" }, "Invalid parameter type for 'encrypt', expected: object"],
  [
    "blockdev-add",
    { driver: "raw", "node-name": "x", file: { ...BD, "take-child-perms": ["write", "bogus"] } },
    "Parameter 'null' does not accept value 'bogus'",
  ],
  [
    "blockdev-add",
    { driver: "raw", "node-name": "x", file: { ...BD, "take-child-perms": ["write", 1] } },
    "Invalid parameter type for 'file.take-child-perms[1]', expected: string",
  ],
  [
    "blockdev-add",
    { ...NBD, server: { type: "inet", host: "h", port: "1", to: 70000 } },
    "Parameter 'to' expects uint16_t",
  ],
  ["blockdev-add", { ...NULL, "latency-ns": 2 ** 64 }, "Parameter 'latency-ns' expects uint64"],
  ["blockdev-add", { ...NULL, "latency-ns": -9223372036854775809n }, "Parameter 'latency-ns' expects uint64"],
  [
    "blockdev-add",
    { ...NULL, size: -9223372036854775809n },
    "Invalid parameter type for 'size', expected: integer",
  ],
  ["blockdev-add", { ...NULL, "latency-ns": -1, bogus: 1 }, "Parameter 'bogus' is unexpected"],
  [
    "blockdev-add",
    { ...NULL, "latency-ns": 18446744073709551615n, bogus: 1 },
    "Parameter 'bogus' is unexpected",
  ],
  ["blockdev-add", { ...NULL, size: -9223372036854775808n, bogus: 1 }, "Parameter 'bogus' is unexpected"],
  ["blockdev-add", { ...NULL, size: -0, bogus: 1 }, "Parameter 'bogus' is unexpected"],
  // the legacy socket address
  ["nbd-server-start", { addr: { type: "unix", data: {} } }, "Parameter 'addr.data.path' is missing"],
  [
    "nbd-server-start",
    { addr: { type: "unix", data: { path: 1 } } },
    "Invalid parameter type for 'addr.data.path', expected: string",
  ],
  ["nbd-server-start", { addr: { type: "unix", path: "x" } }, "Parameter 'addr.data' is missing"],
  [
    "nbd-server-start",
    { addr: { type: "bogus", data: {} } },
    "Parameter 'type' does not accept value 'bogus'",
  ],
  [
    "nbd-server-start",
    { addr: { type: "inet", data: { host: "h", port: 1 } } },
    "Invalid parameter type for 'addr.data.port', expected: string",
  ],
];

function descOf(command: string, args: Record<string, unknown>): string {
  const schema = COMMANDS[command];
  if (schema === undefined) throw new Error(`no schema for ${command}`);
  try {
    schema.parse(args);
  } catch (e) {
    if (isQmpError(e, "GenericError")) return e.desc;
    throw e;
  }
  return "(accepted)";
}

describe("QMP argument validation matches qemu-storage-daemon 7.2", () => {
  it.each(ERRORS.map(([c, a, d]) => [c, toJsonText(a), a, d] as const))("%s %s", (command, _, args, desc) => {
    expect(descOf(command, args)).toBe(desc);
  });

  it("accepts the transcripts' arguments and applies defaults", () => {
    expect(
      BlockdevOptions.parse({ driver: "null-co", "node-name": "n2", size: 1048576, "read-zeroes": true }),
    ).toEqual({ driver: "null-co", "node-name": "n2", size: 1048576, "read-zeroes": true, "latency-ns": 0 });
    expect(
      BlockdevOptions.parse({
        driver: "qcow2",
        "node-name": "ov2",
        backing: null,
        file: { driver: "file", filename: "/tmp/qsd/r3/new-ov2.qcow2" },
      }),
    ).toMatchObject({ backing: null, file: { driver: "file", filename: "/tmp/qsd/r3/new-ov2.qcow2" } });
    expect(BlockdevOptions.parse({ driver: "raw", "node-name": "r", file: "a-file" })).toEqual({
      driver: "raw",
      "node-name": "r",
      file: "a-file",
      offset: 0,
    });
    expect(
      NbdServerStartArguments.parse({ addr: { type: "inet", data: { host: "127.0.0.1", port: "10809" } } }),
    ).toEqual({ addr: { type: "inet", data: { host: "127.0.0.1", port: "10809" } }, "max-connections": 0 });
    expect(descOf("block-dirty-bitmap-add", { node: "a", name: "b", granularity: -4294967296 })).toBe(
      "Parameter 'granularity' expects uint32_t",
    );
  });

  it("can leave defaults out (for QEMU's json: filenames)", () => {
    expect(
      BlockdevOptions.parse({ driver: "null-co", size: 1048576, "read-zeroes": true }, { defaults: false }),
    ).toEqual({ driver: "null-co", size: 1048576, "read-zeroes": true });
  });

  it("infers precise types", () => {
    const Args = q.object({
      device: q.str(),
      force: q.optional(q.bool(), false),
      "job-id": q.optional(q.str()),
    });
    const a: Infer<typeof Args> = Args.parse({ device: "j" });
    const force: boolean = a.force;
    const jobId: string | undefined = a["job-id"];
    expect([force, jobId]).toEqual([false, undefined]);
    const opts = BlockdevOptions.parse({ driver: "nbd", server: { type: "unix", path: "/s" } });
    if (opts.driver === "nbd" && opts.server.type === "unix") expect(opts.server.path).toBe("/s");
    else expect.unreachable();
  });
});

const live = process.env.BLK_QAPI_QEMU !== "0" && missingPeers(["qemu-storage-daemon"]).length === 0;

describe.skipIf(!live)("the same table against the real qemu-storage-daemon", { tags: ["qemu"] }, () => {
  it("agrees on every row", async () => {
    const lines = [
      JSON.stringify({ execute: "qmp_capabilities" }),
      ...ERRORS.map(([execute, args], i) => toJsonText({ execute, arguments: args, id: i })),
      JSON.stringify({ execute: "quit" }),
    ];
    const r = await run("qemu-storage-daemon", ["--chardev", "stdio,id=m", "--monitor", "chardev=m"], {
      input: `${lines.join("\n")}\n`,
      timeoutMs: 20_000,
    });
    const answers = new Map<number, string>();
    for (const line of r.stdout.split("\n")) {
      if (!line.startsWith("{")) continue;
      const msg = JSON.parse(line) as { id?: number; error?: { desc: string }; return?: unknown };
      if (typeof msg.id === "number") answers.set(msg.id, msg.error?.desc ?? "(accepted)");
    }
    ERRORS.forEach(([command, args, desc], i) => {
      expect(answers.get(i), `${command} ${toJsonText(args)}`).toBe(desc);
    });
  });
});
