/**
 * Command-line validation (keyval visitor, and the JSON form of an option) against the exact messages of
 * qemu-storage-daemon 7.2.22. Every row was taken from the real binary (`qemu-storage-daemon --OPTION ARG`);
 * the block at the end (skipped with BLK_QAPI_QEMU=0) replays the whole table against it when it is installed.
 */
import { missingPeers, run } from "@blk/testkit";
import { describe, expect, it } from "vitest";
import {
  BlockdevOptions,
  BlockExportOptions,
  isQmpError,
  NbdServerOptions,
  parseKeyval,
  parseOptionArgument,
  type QapiType,
  QSD_IMPLIED_KEYS,
} from "../src/index.ts";

type Opt = "blockdev" | "export" | "nbd-server";
const SCHEMAS: Record<Opt, QapiType<unknown>> = {
  blockdev: BlockdevOptions,
  export: BlockExportOptions,
  "nbd-server": NbdServerOptions,
};

function parse(opt: Opt, arg: string): unknown {
  const impliedKey = QSD_IMPLIED_KEYS[opt];
  return parseOptionArgument(SCHEMAS[opt], arg, impliedKey === undefined ? {} : { impliedKey });
}

function messageOf(opt: Opt, arg: string): string {
  try {
    parse(opt, arg);
  } catch (e) {
    if (isQmpError(e, "GenericError")) return e.desc;
    throw e;
  }
  return "(accepted)";
}

const B = "driver=null-co,node-name=a";
const BD = "driver=raw,node-name=a,file.driver=blkdebug,file.image=x";
const NBD = "driver=nbd,node-name=a,server.type=inet,server.host=h,server.port=1";
const VU = "type=vhost-user-blk,id=e,node-name=n,addr.type=unix,addr.path=/tmp/vu.sock";
const Q2 = "driver=qcow2,node-name=a,file=f";
const LONG = "a".repeat(129);

/** [option, argument, QEMU's message] */
const ERRORS: readonly (readonly [Opt, string, string])[] = [
  // integers (qemu_strtoi64 / qemu_strtou64, base 0)
  ["blockdev", `${B},size=1x`, "Parameter 'size' expects integer"],
  ["blockdev", `${B},size=abc`, "Parameter 'size' expects integer"],
  ["blockdev", `${B},size=1.5k`, "Parameter 'size' expects integer"],
  ["blockdev", `${B},latency-ns=1k`, "Parameter 'latency-ns' expects integer"],
  ["blockdev", `${B},size=5 `, "Parameter 'size' expects integer"],
  ["blockdev", `${B},size=1e3`, "Parameter 'size' expects integer"],
  ["blockdev", `${B},size=9223372036854775808`, "Parameter 'size' expects integer"],
  ["blockdev", `${B},size=-9223372036854775809`, "Parameter 'size' expects integer"],
  ["blockdev", `${B},size=0x`, "Parameter 'size' expects integer"],
  ["blockdev", `${B},size=08`, "Parameter 'size' expects integer"],
  ["blockdev", `${B},size=`, "Parameter 'size' expects integer"],
  ["blockdev", `${B},size=1_000`, "Parameter 'size' expects integer"],
  ["blockdev", `${BD},file.max-transfer=x`, "Parameter 'file.max-transfer' expects integer"],
  ["blockdev", `${BD},file.max-transfer=4294967296`, "Parameter 'max-transfer' expects int32_t"],
  ["blockdev", `${NBD},reconnect-delay=-1`, "Parameter 'reconnect-delay' expects uint32_t"],
  ["blockdev", `${NBD},reconnect-delay=4294967296`, "Parameter 'reconnect-delay' expects uint32_t"],
  ["blockdev", `${NBD},reconnect-delay=x`, "Parameter 'reconnect-delay' expects integer"],
  // booleans
  ["blockdev", `${B},read-only=ON`, "Parameter 'read-only' expects 'on' or 'off'"],
  ["blockdev", `${B},read-only=1`, "Parameter 'read-only' expects 'on' or 'off'"],
  ["blockdev", `${B},read-only=0`, "Parameter 'read-only' expects 'on' or 'off'"],
  ["blockdev", `${B},read-only=`, "Parameter 'read-only' expects 'on' or 'off'"],
  ["blockdev", `${B},read-only=maybe`, "Parameter 'read-only' expects 'on' or 'off'"],
  ["blockdev", `${B},cache.direct=maybe`, "Parameter 'cache.direct' expects 'on' or 'off'"],
  ["blockdev", `${NBD},server.numeric=x`, "Parameter 'server.numeric' expects 'on' or 'off'"],
  // a repeated key: the last one counts
  ["blockdev", `${B},read-only=on,read-only=maybe`, "Parameter 'read-only' expects 'on' or 'off'"],
  // sizes (qemu_strtosz)
  ...["1kb", "16E", "17E", "-1", "k", "", ".5k", "1.5", "18446744073709551616", "1 k"].map(
    (v) =>
      ["export", `${VU},logical-block-size=${v}`, "Parameter 'logical-block-size' expects size"] as const,
  ),
  // enums and the discriminator
  ["blockdev", "driver", "Parameter 'driver' does not accept value 'driver'"],
  ["blockdev", "driver=nosuch", "Parameter 'driver' does not accept value 'nosuch'"],
  ["blockdev", `${B},detect-zeroes=bogus`, "Parameter 'detect-zeroes' does not accept value 'bogus'"],
  [
    "blockdev",
    "driver=qcow2,node-name=a,file.driver=nosuch",
    "Parameter 'driver' does not accept value 'nosuch'",
  ],
  [
    "blockdev",
    "driver=qcow2,node-name=a,file.driver=file,file.filename=/x,file.aio=bogus",
    "Parameter 'aio' does not accept value 'bogus'",
  ],
  ["blockdev", "driver=nbd,node-name=a,server.type=bogus", "Parameter 'type' does not accept value 'bogus'"],
  ["blockdev", `${BD},file.inject-error.0.event=bogus`, "Parameter 'event' does not accept value 'bogus'"],
  ["blockdev", "node-name=a", "Parameter 'driver' is missing"],
  ["blockdev", "a_b=1", "Parameter 'driver' is missing"],
  ["blockdev", "null-co=x", "Parameter 'driver' is missing"],
  // missing / unexpected members, nested
  ["blockdev", `${B},bogus=1`, "Parameter 'bogus' is unexpected"],
  ["blockdev", "null-co,node-name=a,bogus=1", "Parameter 'bogus' is unexpected"],
  ["blockdev", `${B},cache.bogus=1`, "Parameter 'cache.bogus' is unexpected"],
  ["blockdev", `${B},__com.x_y=1`, "Parameter '__com.x_y' is unexpected"],
  ["blockdev", `${B},x.__com.x_y=1`, "Parameter 'x' is unexpected"],
  ["blockdev", `${B},x.a_b-c=1`, "Parameter 'x' is unexpected"],
  ["blockdev", `${B},x.0=1,x.00=2`, "Parameter 'x' is unexpected"],
  ["blockdev", "driver=raw,node-name=a,file.driver=file", "Parameter 'file.filename' is missing"],
  ["blockdev", "driver=nbd,node-name=a,server.type=inet,server.host=h", "Parameter 'server.port' is missing"],
  ["blockdev", "driver=nbd,node-name=a", "Parameter 'server' is missing"],
  ["blockdev", `${NBD},server.bogus=1`, "Parameter 'server.bogus' is unexpected"],
  [
    "blockdev",
    `${BD},file.inject-error.0.event=read_aio,file.inject-error.0.errno=x`,
    "Parameter 'file.inject-error.0.errno' expects integer",
  ],
  [
    "blockdev",
    `${BD},file.inject-error.0.event=read_aio,file.inject-error.1.x=x`,
    "Parameter 'file.inject-error.1.event' is missing",
  ],
  // a group where a scalar belongs, a scalar where a group belongs
  ["blockdev", `${B},read-only.x=1`, "Parameters 'read-only.*' are unexpected"],
  ["blockdev", `${B},size.0=1`, "Parameters 'size.*' are unexpected"],
  ["blockdev", "driver=null-co,node-name.x=a", "Parameters 'node-name.*' are unexpected"],
  ["blockdev", "driver.x=null-co", "Parameters 'driver.*' are unexpected"],
  ["blockdev", `${B},detect-zeroes.x=1`, "Parameters 'detect-zeroes.*' are unexpected"],
  ["blockdev", `${B},cache=x`, "Invalid parameter type for 'cache', expected: object"],
  ["blockdev", `${B},cache.0=x`, "Invalid parameter type for 'cache', expected: object"],
  ["blockdev", "driver=nbd,node-name=a,server=x", "Invalid parameter type for 'server', expected: object"],
  ["blockdev", "driver=raw,node-name=a,file.0=x", "Invalid parameter type for 'file', expected: BlockdevRef"],
  [
    "blockdev",
    `${BD},file.inject-error=x`,
    "Invalid parameter type for 'file.inject-error', expected: array",
  ],
  [
    "blockdev",
    `${BD},file.inject-error.a=x`,
    "Invalid parameter type for 'file.inject-error', expected: array",
  ],
  [
    "blockdev",
    `${BD},file.inject-error.0=x`,
    "Invalid parameter type for 'file.inject-error.0', expected: object",
  ],
  // alternates with an enum branch, unions nested in drivers, sized integers, lists of enums
  ["blockdev", `${Q2},overlap-check=bogus`, "Parameter 'overlap-check' does not accept value 'bogus'"],
  ["blockdev", `${Q2},overlap-check.template=bogus`, "Parameter 'template' does not accept value 'bogus'"],
  [
    "blockdev",
    `${Q2},overlap-check.main-header=x`,
    "Parameter 'overlap-check.main-header' expects 'on' or 'off'",
  ],
  ["blockdev", `${Q2},overlap-check.bogus=1`, "Parameter 'overlap-check.bogus' is unexpected"],
  ["blockdev", `${Q2},encrypt.format=bogus`, "Parameter 'format' does not accept value 'bogus'"],
  ["blockdev", `${Q2},encrypt.format=luks,encrypt.x=1`, "Parameter 'encrypt.x' is unexpected"],
  ["blockdev", `${Q2},backing.driver=bogus`, "Parameter 'driver' does not accept value 'bogus'"],
  ["blockdev", `${Q2},backing.0=x`, "Invalid parameter type for 'backing', expected: BlockdevRefOrNull"],
  ["blockdev", `${Q2},cache-clean-interval=x`, "Parameter 'cache-clean-interval' expects integer"],
  ["blockdev", `${BD},file.take-child-perms.0=bogus`, "Parameter 'null' does not accept value 'bogus'"],
  ["blockdev", `${BD},file.set-state.0.event=read_aio`, "Parameter 'file.set-state.0.new_state' is missing"],
  ["blockdev", `${NBD},server.to=70000`, "Parameter 'to' expects uint16_t"],
  ["blockdev", "driver=nbd,node-name=a,server.type=fd", "Parameter 'server.str' is missing"],
  [
    "blockdev",
    "driver=nbd,node-name=a,server.type=unix,server.path=p,server.bogus=1",
    "Parameter 'server.bogus' is unexpected",
  ],
  // keyval syntax
  ["blockdev", "=x", "Invalid parameter ''"],
  ["blockdev", "a.=1", "Invalid parameter 'a.'"],
  ["blockdev", ".a=1", "Invalid parameter '.a'"],
  ["blockdev", "a..b=1", "Invalid parameter 'a..b'"],
  ["blockdev", "1a=1", "Invalid parameter '1a'"],
  ["blockdev", `${B},_x=1`, "Invalid parameter '_x'"],
  ["blockdev", `${B},x.-a=1`, "Invalid parameter 'x.-a'"],
  ["blockdev", `${B},a=1,a=2,=3`, "Invalid parameter ''"],
  ["blockdev", "null-co,,x,node-name=a,bogus=1", "Invalid parameter ''"],
  ["blockdev", `${B},a`, "Expected '=' after parameter 'a'"],
  ["nbd-server", "nbd,id=e,node-name=n", "Expected '=' after parameter 'nbd'"],
  ["blockdev", `${B},cache=x,cache.direct=on`, "Parameters 'cache.*' used inconsistently"],
  ["blockdev", `${B},cache.direct=on,cache=x`, "Parameters 'cache.*' used inconsistently"],
  ["blockdev", `${B},x.0=1,x.a=2`, "Parameters 'x.*' used inconsistently"],
  ["blockdev", `${B},read-only=on,x.y=1,x=2`, "Parameters 'x.*' used inconsistently"],
  ["blockdev", `${B},a.b.c=1,a.b=2`, "Parameters 'a.b.*' used inconsistently"],
  ["blockdev", `${B},a.b.c=1,a.b.0=2`, "Parameters 'a.b.*' used inconsistently"],
  ["blockdev", `${B},a.b.0=1,a.b.x=2`, "Parameters 'a.b.*' used inconsistently"],
  ["blockdev", `${B},a.b=1,a.c.0=1,a.c.x=1`, "Parameters 'a.c.*' used inconsistently"],
  ["blockdev", `${B},x.1=1`, "Parameter 'x.0' missing"],
  ["blockdev", `${B},x.01=1`, "Parameter 'x.0' missing"],
  ["blockdev", `${B},${LONG}=1`, `Parameter '${LONG}' is too long`],
  ["blockdev", `${B},x.${LONG}=1`, `Parameter fragment '${LONG}' is too long`],
  ["blockdev", "help", "Help is not available for this option"],
  ["blockdev", "driver=null-co,help", "Help is not available for this option"],
  // the JSON form
  ["blockdev", '{"driver":', "JSON parse error, premature EOI"],
  ["blockdev", '{"driver":"null-co","node-name":"a"} x', "Expecting at most one JSON value"],
  ["blockdev", '{"driver":"null-co","node-name":"a","x":[1]}', "Parameter 'x' is unexpected"],
  [
    "blockdev",
    `{"driver":"nbd","node-name":"a","server":{"type":"inet","host":"h","port":"1"},"reconnect-delay":"x"}`,
    "Parameter 'reconnect-delay' expects uint64",
  ],
  ["blockdev", "[1]", "Parameter 'driver' does not accept value '[1]'"],
  ["blockdev", ' {"driver":"nbd"}', `Parameter 'driver' does not accept value ' {"driver":"nbd"}'`],
  // other options
  ["export", "id=e", "Parameter 'type' is missing"],
  ["export", "addr.type=unix", "Parameter 'type' is missing"],
  ["nbd-server", "id=e", "Parameter 'addr' is missing"],
  ["nbd-server", "addr.type=unix", "Parameter 'addr.path' is missing"],
  // the command-line errors qmp.md §2 quotes
  ["nbd-server", "addr.type=inet,addr.host=127.0.0.1", "Parameter 'addr.port' is missing"],
  ["blockdev", "driver=qcow2,node-name=x", "Parameter 'file' is missing"],
  [
    "nbd-server",
    "addr.type=unix,addr.path=/tmp/n.sock,max-connections=x",
    "Parameter 'max-connections' expects integer",
  ],
];

const FILE_DEFAULTS = {
  locking: "auto",
  aio: "threads",
  "aio-max-batch": 0,
  "drop-cache": true,
  "x-check-cache-dropped": false,
};
const QCOW2_DEFAULTS = {
  "pass-discard-snapshot": true,
  "pass-discard-other": false,
  "overlap-check": "cached",
  "cache-clean-interval": 600,
};
const NBD_EXPORT_DEFAULTS = {
  "fixed-iothread": false,
  writable: false,
  writethrough: false,
  "allocation-depth": false,
};

/** Every keyval option of qmp-transcripts.md (§4 command line, §9 daemon), verbatim, and what it parses to. */
const TRANSCRIPT_OPTIONS: readonly (readonly [Opt, string, unknown])[] = [
  [
    "blockdev",
    "driver=file,node-name=disk-file,filename=/tmp/qsd/r4/disk.qcow2",
    { driver: "file", "node-name": "disk-file", filename: "/tmp/qsd/r4/disk.qcow2", ...FILE_DEFAULTS },
  ],
  [
    "blockdev",
    "driver=qcow2,node-name=disk,file=disk-file",
    { driver: "qcow2", "node-name": "disk", file: "disk-file", ...QCOW2_DEFAULTS },
  ],
  [
    "blockdev",
    "driver=throttle,node-name=disk-thr,throttle-group=tg0,file=disk",
    { driver: "throttle", "node-name": "disk-thr", "throttle-group": "tg0", file: "disk" },
  ],
  [
    "nbd-server",
    "addr.type=unix,addr.path=/tmp/qsd/r4/nbd.sock,max-connections=4",
    { addr: { type: "unix", path: "/tmp/qsd/r4/nbd.sock" }, "max-connections": 4 },
  ],
  [
    "export",
    "type=nbd,id=exp0,node-name=disk-thr,name=disk,writable=on",
    {
      type: "nbd",
      id: "exp0",
      "node-name": "disk-thr",
      name: "disk",
      ...NBD_EXPORT_DEFAULTS,
      writable: true,
    },
  ],
  [
    "blockdev",
    "driver=qcow2,node-name=a,file.driver=file,file.filename=a.qcow2",
    {
      driver: "qcow2",
      "node-name": "a",
      file: { driver: "file", filename: "a.qcow2", ...FILE_DEFAULTS },
      ...QCOW2_DEFAULTS,
    },
  ],
  [
    "blockdev",
    "driver=throttle,node-name=ta,throttle-group=tg0,file=a",
    { driver: "throttle", "node-name": "ta", "throttle-group": "tg0", file: "a" },
  ],
  [
    "nbd-server",
    "addr.type=unix,addr.path=nbd.sock",
    { addr: { type: "unix", path: "nbd.sock" }, "max-connections": 0 },
  ],
  [
    "export",
    "type=nbd,id=e0,node-name=ta,name=ta",
    { type: "nbd", id: "e0", "node-name": "ta", name: "ta", ...NBD_EXPORT_DEFAULTS },
  ],
];

/** Arguments QEMU accepts: with `,bogus=1` appended both sides must complain about `bogus` only. */
const ACCEPTED: readonly (readonly [Opt, string])[] = [
  ...TRANSCRIPT_OPTIONS.map(([opt, arg]) => [opt, arg] as const),
  ...["on", "off", "yes", "no", "true", "false", "y", "n"].map(
    (v) => ["blockdev", `${B},read-only=${v}`] as const,
  ),
  ...["0x10", "010", "-5", " 5", "+5", "9223372036854775807"].map(
    (v) => ["blockdev", `${B},size=${v}`] as const,
  ),
  ["blockdev", `${B},read-only=maybe,read-only=on`],
  ["blockdev", `${Q2},data-file=x,overlap-check=none,encrypt.format=aes,backing=`],
  ...[
    "512",
    "1k",
    "1K",
    "1.5k",
    "1b",
    "1B",
    "0x200",
    "1e",
    " 1k",
    "1.k",
    "18446744073709551615",
    "1T",
    "1P",
    "08",
    "010",
  ].map((v) => ["export", `${VU},logical-block-size=${v}`] as const),
];

describe("command-line validation matches qemu-storage-daemon 7.2", () => {
  it.each(ERRORS)("--%s %s", (opt, arg, message) => {
    expect(messageOf(opt, arg)).toBe(message);
  });

  it.each(ACCEPTED)("--%s %s is accepted", (opt, arg) => {
    expect(() => parse(opt, arg)).not.toThrow();
    expect(messageOf(opt, `${arg},bogus=1`)).toBe("Parameter 'bogus' is unexpected");
  });

  it.each(TRANSCRIPT_OPTIONS)("--%s %s (from qmp-transcripts.md)", (opt, arg, want) => {
    expect(parse(opt, arg)).toEqual(want);
  });

  it("parses the transcripts' --object and --monitor arguments with their implied keys", () => {
    expect(
      parseKeyval("throttle-group,id=tg0,x-bps-total=10485760,x-iops-total=1000", {
        impliedKey: QSD_IMPLIED_KEYS.object,
      }),
    ).toEqual({ "qom-type": "throttle-group", id: "tg0", "x-bps-total": "10485760", "x-iops-total": "1000" });
    expect(
      parseKeyval("throttle-group,id=tg0,x-bps-total=1048576", { impliedKey: QSD_IMPLIED_KEYS.object }),
    ).toEqual({ "qom-type": "throttle-group", id: "tg0", "x-bps-total": "1048576" });
    expect(parseKeyval("chardev=m", { impliedKey: QSD_IMPLIED_KEYS.monitor })).toEqual({ chardev: "m" });
    expect(parseKeyval("m", { impliedKey: QSD_IMPLIED_KEYS.monitor })).toEqual({ chardev: "m" });
  });

  it("builds the documented example", () => {
    expect(
      parse("blockdev", "driver=qcow2,node-name=disk,file.driver=file,file.filename=/tmp/d.qcow2"),
    ).toEqual({
      driver: "qcow2",
      "node-name": "disk",
      file: {
        driver: "file",
        filename: "/tmp/d.qcow2",
        locking: "auto",
        aio: "threads",
        "aio-max-batch": 0,
        "drop-cache": true,
        "x-check-cache-dropped": false,
      },
      "pass-discard-snapshot": true,
      "pass-discard-other": false,
      "overlap-check": "cached",
      "cache-clean-interval": 600,
    });
  });

  it("takes a string child as a node reference and converts scalars per type", () => {
    expect(
      parse(
        "blockdev",
        "driver=throttle,node-name=disk-thr,throttle-group=tg0,file=disk,read-only=on,cache.direct=yes",
      ),
    ).toEqual({
      driver: "throttle",
      "node-name": "disk-thr",
      "throttle-group": "tg0",
      file: "disk",
      "read-only": true,
      cache: { direct: true },
    });
    expect(parse("blockdev", "null-co,node-name=n,size=0x100000,latency-ns=-1")).toMatchObject({
      driver: "null-co",
      size: 1048576,
      "latency-ns": 2 ** 64,
    });
  });

  it("builds lists from numeric indices", () => {
    const v = parse(
      "blockdev",
      `${BD},file.inject-error.1.event=write_aio,file.inject-error.0.event=read_aio,file.inject-error.0.errno=28,file.take-child-perms.0=write`,
    );
    expect(v).toMatchObject({
      file: {
        "inject-error": [
          { event: "read_aio", errno: 28, once: false, immediately: false },
          { event: "write_aio", errno: 5 },
        ],
        "take-child-perms": ["write"],
      },
    });
  });

  it("parses --nbd-server and --export", () => {
    expect(parse("nbd-server", "addr.type=unix,addr.path=/tmp/qsd/nbd.sock,max-connections=4")).toEqual({
      addr: { type: "unix", path: "/tmp/qsd/nbd.sock" },
      "max-connections": 4,
    });
    expect(parse("nbd-server", "addr.type=inet,addr.host=127.0.0.1,addr.port=10809")).toEqual({
      addr: { type: "inet", host: "127.0.0.1", port: "10809" },
      "max-connections": 0,
    });
    expect(parse("export", "type=nbd,id=exp0,node-name=disk-thr,name=disk,writable=on")).toEqual({
      type: "nbd",
      id: "exp0",
      "fixed-iothread": false,
      "node-name": "disk-thr",
      writable: true,
      writethrough: false,
      name: "disk",
      "allocation-depth": false,
    });
    expect(parse("export", `${VU},logical-block-size=1.5k`)).toMatchObject({ "logical-block-size": 1536 });
  });
});

// Live unless BLK_QAPI_QEMU=0: ~130 daemon start-ups (a few seconds).
const live = process.env.BLK_QAPI_QEMU !== "0" && missingPeers(["qemu-storage-daemon"]).length === 0;

describe.skipIf(!live)("the same table against the real qemu-storage-daemon", { tags: ["qemu"] }, () => {
  async function qemuMessage(opt: Opt, arg: string): Promise<string> {
    const r = await run("qemu-storage-daemon", [`--${opt}`, arg], { timeoutMs: 10_000 });
    const prefix = `qemu-storage-daemon: --${opt} ${arg}: `;
    const lines = r.stderr
      .split("\n")
      .filter((l) => l.startsWith(prefix))
      .map((l) => l.slice(prefix.length))
      .filter((l) => !l.startsWith("warning:"));
    return lines.at(-1) ?? `(exit ${String(r.code)}: ${r.stderr})`;
  }

  it("agrees on every error row", async () => {
    for (const [opt, arg, message] of ERRORS) {
      expect(await qemuMessage(opt, arg), `--${opt} ${arg}`).toBe(message);
    }
  });

  it("agrees on every accepted row", async () => {
    for (const [opt, arg] of ACCEPTED) {
      expect(await qemuMessage(opt, `${arg},bogus=1`), `--${opt} ${arg}`).toBe(
        "Parameter 'bogus' is unexpected",
      );
    }
  });
});
