import { BlkError, isBlkError } from "@blk/core";
import { describe, expect, it } from "vitest";
import {
  type BlockdevOptionsGluster,
  formatGlusterUri,
  GLUSTER_JSON_USAGE,
  GLUSTER_URI_USAGE,
  GlusterError,
  parseGlusterOptions,
  parseGlusterPort,
  parseGlusterUri,
  resolveGlusterConnection,
  validateGlusterOptions,
} from "../src/gluster/index.ts";
import * as root from "../src/index.ts";
import {
  type Expected,
  JSON_EXTRA_VECTORS,
  JSON_VECTORS,
  URI_EXTRA_VECTORS,
  URI_VECTORS,
  type Vector,
} from "./gluster-vectors.ts";

/** The error a call throws (fails the test when it returns). */
function thrown(f: () => unknown): GlusterError {
  try {
    f();
  } catch (e) {
    expect(e).toBeInstanceOf(GlusterError);
    return e as GlusterError;
  }
  throw new Error("expected a throw");
}

/** Checks one stage outcome against a row. */
function expectRow(
  expected: Expected,
  run: (onWarning: (w: string) => void) => BlockdevOptionsGluster,
  filename?: string,
) {
  const warnings: string[] = [];
  if ("error" in expected) {
    const e = thrown(() => run((w) => warnings.push(w)));
    expect(isBlkError(e, "EINVAL")).toBe(true);
    expect(e.errno).toBe(-22);
    expect(e.message).toBe(expected.error);
    expect(e.hint).toBe(expected.hint);
    expect(e.serverIndex).toBe(expected.serverIndex);
  } else {
    const got = run((w) => warnings.push(w));
    expect(got).toEqual(expected.ok);
    if (expected.connectError === undefined) {
      const conn = resolveGlusterConnection(got, filename);
      expect(conn.volume).toBe(got.volume);
      expect(conn.servers).toHaveLength(got.server.length);
    } else {
      const e = thrown(() => resolveGlusterConnection(got, filename));
      expect(e.code).toBe("EINVAL");
      expect(e.message).toBe(expected.connectError);
      expect(e.hint).toBeUndefined();
    }
  }
  expect(warnings).toEqual(expected.warnings ?? []);
}

const rowName = (v: Vector): string => `${v.id}: ${JSON.stringify(v.input)}`;

describe("gluster URI vectors (spec §3)", () => {
  it("has all 66 rows", () => {
    expect(URI_VECTORS.map((v) => v.id)).toEqual(Array.from({ length: 66 }, (_, i) => String(i + 1)));
  });
  for (const v of [...URI_VECTORS, ...URI_EXTRA_VECTORS]) {
    it(rowName(v), () => {
      expectRow(v.expected, (onWarning) => parseGlusterUri(v.input, { onWarning }), v.input);
      // the open-level entry gives the same for a plain string
      expectRow(v.expected, (onWarning) => parseGlusterOptions(v.input, { onWarning }), v.input);
    });
  }
});

describe("gluster JSON vectors (spec §5)", () => {
  it("has all 32 rows", () => {
    expect(JSON_VECTORS.map((v) => v.id)).toEqual(Array.from({ length: 32 }, (_, i) => `J${i + 1}`));
  });
  for (const v of [...JSON_VECTORS, ...JSON_EXTRA_VECTORS]) {
    it(rowName(v), () => {
      const parsed: unknown = JSON.parse(v.input);
      const inner =
        typeof parsed === "object" && parsed !== null && "filename" in parsed ? parsed.filename : undefined;
      const filename = typeof inner === "string" ? inner : undefined;
      // as qemu-img gets it
      expectRow(v.expected, (onWarning) => parseGlusterOptions(`json:${v.input}`, { onWarning }), filename);
      // as a library caller passes it (J32 names a qcow2 node: its `file` child is the gluster node)
      const node = v.id === "J32" ? (parsed as { file: Record<string, unknown> }).file : parsed;
      if (typeof node === "object" && node !== null && !Array.isArray(node)) {
        expectRow(v.expected, () => parseGlusterOptions(node as Record<string, unknown>), filename);
      }
    });
  }

  const plainRows = [...JSON_VECTORS, ...JSON_EXTRA_VECTORS].filter(
    (v) => !/"filename"|"debug"|"file"/.test(v.input) && v.input.startsWith("{"),
  );
  for (const v of plainRows) {
    it(`validateGlusterOptions ${v.id}`, () => {
      expectRow(v.expected, () => validateGlusterOptions(JSON.parse(v.input)));
    });
  }
});

const validRows = [...URI_VECTORS, ...URI_EXTRA_VECTORS].filter((v) => "ok" in v.expected);

describe("formatGlusterUri round trip", () => {
  for (const v of validRows) {
    it(rowName(v), () => {
      const once = parseGlusterUri(v.input);
      if (once.server[0]?.type === "inet" && once.server[0].host === "") {
        // X13: a %00 host decodes to "", which only a NUL escape could express again
        expect(() => formatGlusterUri(once)).toThrow(BlkError);
        return;
      }
      const url = formatGlusterUri(once);
      expect(parseGlusterUri(url)).toEqual(once);
      expect(formatGlusterUri(parseGlusterUri(url))).toBe(url);
    });
  }

  it.each([
    ["gluster://127.0.0.1/testvol/a.img", "gluster://127.0.0.1/testvol/a.img"],
    ["gluster://127.0.0.1:0/testvol/a.img", "gluster://127.0.0.1/testvol/a.img"],
    ["gluster+rdma://127.0.0.1:24010/testvol/a.img", "gluster://127.0.0.1:24010/testvol/a.img"],
    ["gluster:testvol/a.img", "gluster://localhost/testvol/a.img"],
    ["gluster+tcp://[::1]:24009/testvol/dir/a.img", "gluster://[::1]:24009/testvol/dir/a.img"],
    ["gluster://[fe80::1%25lo]:24026/testvol/a.img", "gluster://[fe80::1%25lo]:24026/testvol/a.img"],
    ["gluster://127.0.0.1/testvol/a%2Fb.img", "gluster://127.0.0.1/testvol/a/b.img"],
    ["gluster://127.0.0.1/test%20vol/a%20b.img", "gluster://127.0.0.1/test%20vol/a%20b.img"],
    ["gluster+unix:///testvol/a.img?socket=", "gluster+unix:///testvol/a.img?socket="],
    [
      "gluster+unix:///testvol/a.img?socket=/tmp/a%20b.sock",
      "gluster+unix:///testvol/a.img?socket=/tmp/a%20b.sock",
    ],
  ])("formats %s as %s", (input, url) => {
    expect(formatGlusterUri(parseGlusterUri(input))).toBe(url);
  });

  it.each([
    [{ type: "inet", host: "::1", port: "24015" }, "gluster://%3A%3A1:24015/v/p"],
    [{ type: "unix", path: "/tmp/a&b;c#d?e" }, "gluster+unix:///v/p?socket=/tmp/a%26b%3Bc%23d%3Fe"],
    [{ type: "inet", host: "[x]y", port: "1" }, "gluster://%5Bx%5Dy:1/v/p"],
  ] as const)("writes JSON-form server %j so that it parses back", (server, url) => {
    const options: BlockdevOptionsGluster = { volume: "v", path: "p", server: [server] };
    expect(formatGlusterUri(options)).toBe(url);
    expect(parseGlusterUri(url)).toEqual(options);
  });

  const inet = { type: "inet", host: "h", port: "24007" } as const;
  it.each([
    ["two servers", { volume: "v", path: "p", server: [inet, inet] }, "gluster URI cannot express 2 servers"],
    ["no server", { volume: "v", path: "p", server: [] }, "gluster URI cannot express 0 servers"],
    ["empty volume (J12)", { volume: "", path: "p", server: [inet] }, "volume ''"],
    ["'/' in volume", { volume: "a/b", path: "p", server: [inet] }, "volume 'a/b'"],
    ["empty path", { volume: "v", path: "", server: [inet] }, "path ''"],
    ["leading '/' in path (J1)", { volume: "v", path: "/a.img", server: [inet] }, "path '/a.img'"],
    ["NUL in path", { volume: "v", path: "a\0b", server: [inet] }, "it contains NUL"],
    ["lone surrogate", { volume: "v\uD800", path: "p", server: [inet] }, "not valid Unicode"],
    ["empty host", { volume: "v", path: "p", server: [{ ...inet, host: "" }] }, "host ''"],
    ["port 0 (J7)", { volume: "v", path: "p", server: [{ ...inet, port: "0" }] }, "port '0'"],
    ["port +5 (J30)", { volume: "v", path: "p", server: [{ ...inet, port: "+5" }] }, "port '+5'"],
    ["port 024008", { volume: "v", path: "p", server: [{ ...inet, port: "024008" }] }, "port '024008'"],
    ["port 65536", { volume: "v", path: "p", server: [{ ...inet, port: "65536" }] }, "port '65536'"],
    ["port abc (J27)", { volume: "v", path: "p", server: [{ ...inet, port: "abc" }] }, "port 'abc'"],
    ["NUL in socket", { volume: "v", path: "p", server: [{ type: "unix", path: "\0" }] }, "socket"],
  ] as [string, BlockdevOptionsGluster, string][])("refuses %s", (_, options, text) => {
    const e = (() => {
      try {
        formatGlusterUri(options);
      } catch (err) {
        return err;
      }
      return undefined;
    })();
    expect(isBlkError(e, "EINVAL")).toBe(true);
    expect((e as BlkError).message).toContain(text);
  });
});

describe("connect-time port check (parseGlusterPort)", () => {
  it.each([
    ["24007", 24007],
    ["0", 0],
    ["+5", 5],
    [" 24030", 24030],
    ["\t\n\v\f\r 1", 1],
    ["00024032", 24032],
    ["65535", 65535],
    ["000000000000000000000065535", 65535],
  ])("accepts %j as %d", (port, n) => {
    expect(parseGlusterPort(port)).toBe(n);
  });
  it.each([
    "abc",
    "70000",
    "65536",
    "",
    "-1",
    "-0",
    "0x10",
    "24031 ",
    "+",
    "++5",
    "+-5",
    "1e3",
    "１",
    "99999999999999999999999",
  ])("rejects %j", (port) => {
    const e = thrown(() => parseGlusterPort(port));
    expect(e.message).toBe(`'${port}' is not a valid port number`);
    expect(e.hint).toBeUndefined();
  });
  it("reports the first bad port in server order", () => {
    const e = thrown(() =>
      resolveGlusterConnection({
        volume: "v",
        path: "p",
        server: [
          { type: "inet", host: "h", port: "1" },
          { type: "inet", host: "h", port: "x" },
          { type: "inet", host: "h", port: "y" },
        ],
      }),
    );
    expect(e.message).toBe("'x' is not a valid port number");
  });
  it("checks the volume name before any port", () => {
    const e = thrown(() =>
      resolveGlusterConnection(
        { volume: "a.b", path: "p", server: [{ type: "inet", host: "h", port: "x" }] },
        "f",
      ),
    );
    expect(e.message).toBe("Could not open 'f': Invalid argument");
  });
  it("returns numeric ports for libgfapi", () => {
    expect(
      resolveGlusterConnection(validateGlusterOptions(JSON.parse(JSON_VECTORS[29]?.input ?? ""))),
    ).toEqual({
      volume: "testvol",
      path: "a.img",
      servers: [{ type: "inet", host: "127.0.0.1", port: 5 }],
    });
  });
});

describe("rejection rules (spec §2 step by step)", () => {
  const invalid = (uri: string) => {
    const e = thrown(() => parseGlusterUri(uri));
    expect(e.message).toBe(`invalid URI ${uri}`);
    expect(e.hint).toBe(GLUSTER_URI_USAGE);
    expect(e.usage).toBe(GLUSTER_URI_USAGE);
  };
  it.each([
    // 1. splitting
    "gluster://[::1/v/a",
    "gluster://::1/v/a",
    "gluster://h:abc/v/a",
    "gluster://h:/v/a",
    "gluster://h:-1/v/a",
    "gluster://h:65536/v/a",
    "gluster://h:0000000000065536/v/a",
    "gluster://h/v/a%zz",
    "gluster://h/v/a%2",
    "gluster://h/v/a b",
    "gluster://h/v/a\\b",
    "gluster://h/v/a|b",
    "gluster://h%/v/a",
    "gluster://h/v/a?%",
    "gluster://h/v/a?x#%",
    "gluster://h/v/a\0",
    // 4. volume and path
    "gluster://h",
    "gluster://h/",
    "gluster://h//",
    "gluster://h/v",
    "gluster://h/v/",
    "gluster://h/v//",
    "gluster://h/%2Fv%2F",
    "gluster:v",
    // 5. query
    "gluster://h/v/a?x",
    "gluster://h/v/a?=",
    "gluster://h/v/a?socket=s",
    "gluster+unix:///v/a",
    "gluster+unix:///v/a?",
    "gluster+unix:///v/a?&&",
    "gluster+unix:///v/a?socket=s&socket=t",
    "gluster+unix:///v/a?socket=s;x",
    // 6. unix
    "gluster+unix://h/v/a?socket=s",
    "gluster+unix://:1/v/a?socket=s",
    "gluster+unix://[::1]/v/a?socket=s",
    "gluster+unix://%00/v/a?socket=s",
    "gluster+unix:///v/a?Socket=s",
    // deviations: bytes that are not UTF-8
    "gluster://h/v/a%FF",
    "gluster://h%C3/v/a",
    "gluster+unix:///v/a?socket=%FF",
  ])("invalid URI: %j", invalid);

  it("a decoded NUL in the parameter name ends it (C strings)", () => {
    expect(parseGlusterUri("gluster+unix:///v/a?socket%00x=s").server).toBeDefined();
  });

  it("rdma warns once, before later checks", () => {
    const warnings: string[] = [];
    expect(() => parseGlusterUri("gluster+rdma://h/v?x", { onWarning: (w) => warnings.push(w) })).toThrow(
      "invalid URI gluster+rdma://h/v?x",
    );
    expect(warnings).toEqual(["rdma feature is not supported, falling back to tcp"]);
    expect(() => parseGlusterUri("gluster+rdma://h/v/a")).not.toThrow();
  });

  it("an unknown protocol is reported before the URI is looked at", () => {
    const e = thrown(() => parseGlusterUri("gluster+x://[/"));
    expect(e.message).toBe("Unknown protocol 'gluster+x'");
    expect(e.hint).toBeUndefined();
    expect(e.usage).toBeUndefined();
  });

  it("a ':' after the first '/' is no protocol", () => {
    expect(parseGlusterUri("v/a:b")).toEqual({
      volume: "v",
      path: "a:b",
      server: [{ type: "inet", host: "localhost", port: "24007" }],
    });
  });

  it("keeps '+' and other sub-delims literally", () => {
    expect(parseGlusterUri("gluster+unix:///v/a+b!$'()*,;=:@?socket=/s+t=u")).toEqual({
      volume: "v",
      path: "a+b!$'()*,;=:@",
      server: [{ type: "unix", path: "/s+t=u" }],
    });
  });
});

describe("JSON form rules", () => {
  const base = { driver: "gluster", volume: "v", path: "p" };
  it("accepts dotted keys as -drive gives them", () => {
    expect(
      validateGlusterOptions({
        ...base,
        "server.0.type": "inet",
        "server.0.host": "h",
        "server.0.port": "1",
        "server.1.type": "unix",
        "server.1.socket": "/s",
      }),
    ).toEqual({
      volume: "v",
      path: "p",
      server: [
        { type: "inet", host: "h", port: "1" },
        { type: "unix", path: "/s" },
      ],
    });
  });

  it.each([
    ["a scalar and a group for the same index", { ...base, server: { 0: 1 }, "server.0.type": "unix" }],
    ["an index with a leading zero", { ...base, server: { "00": { type: "unix", path: "/s" } } }],
    ["a scalar server", { ...base, server: "gluster://h/v/a" }],
    ["an empty object", { ...base, server: {} }],
  ])("reports a missing server for %s", (_, options) => {
    const e = thrown(() => validateGlusterOptions(options));
    expect(e.message).toBe("Parameter 'server' is missing");
    expect(e.hint).toBe(GLUSTER_JSON_USAGE);
    expect(e.serverIndex).toBeUndefined();
  });

  it("checks server count before volume and path", () => {
    expect(thrown(() => validateGlusterOptions({})).message).toBe("Parameter 'server' is missing");
  });

  it.each([null, 5, "x", [], [{ volume: "v" }], new Date(0)])("refuses non-object %j", (input) => {
    const e = thrown(() => validateGlusterOptions(input));
    expect(e.message).toBe("Invalid JSON object given");
  });

  it("ignores undefined values like absent keys", () => {
    expect(
      thrown(() =>
        validateGlusterOptions({ ...base, volume: undefined, server: [{ type: "unix", path: "/s" }] }),
      ).message,
    ).toBe("Parameter 'volume' is missing");
  });

  it("prints numbers as QEMU does", () => {
    const port = (p: unknown) =>
      (
        validateGlusterOptions({ ...base, server: [{ type: "inet", host: "h", port: p }] }).server[0] as {
          port: string;
        }
      ).port;
    expect(port(24018)).toBe("24018");
    expect(port(1.5)).toBe("1.5");
    expect(port(-0)).toBe("0");
    expect(port(1e21)).toBe("1e+21");
    // reference values from C's printf("%.17g")
    expect(port(1.25e-7)).toBe("1.2499999999999999e-07");
    expect(port(0.0001)).toBe("0.0001");
    expect(port(1e-5)).toBe("1.0000000000000001e-05");
    expect(port(123.456)).toBe("123.456");
    expect(port(1e16)).toBe("10000000000000000");
    expect(port(1e17)).toBe("100000000000000000");
    expect(port(1.5e17)).toBe("150000000000000000");
    expect(port(123456789012345680000)).toBe("1.2345678901234568e+20");
    expect(port(5e-324)).toBe("4.9406564584124654e-324");
    expect(port(1.7976931348623157e308)).toBe("1.7976931348623157e+308");
    expect(port(-1.5)).toBe("-1.5");
    expect(port(-2.5e-300)).toBe("-2.5e-300");
    expect(port(-(2 ** 63))).toBe("-9223372036854775808");
    expect(port(2 ** 64 - 2048)).toBe("18446744073709549568");
    expect(port(2 ** 64)).toBe("1.8446744073709552e+19");
    expect(port(Number.NaN)).toBe("nan");
    expect(port(-Infinity)).toBe("-inf");
    expect(port(false)).toBe("off");
    expect(port(12n)).toBe("12");
  });

  it("clamps debug to 0-9 the way QEMU stores it", () => {
    const debug = (d: unknown) => parseGlusterOptions({ filename: "gluster://h/v/a", debug: d }).debug;
    expect(debug(5)).toBe(5);
    expect(debug(42)).toBe(9);
    expect(debug("0x3")).toBe(3);
    expect(debug("010")).toBe(8);
    expect(debug("-1")).toBe(0);
    expect(debug("4294967296")).toBe(0);
    expect(debug(" +7")).toBe(7);
    expect(thrown(() => debug("08")).message).toBe("Parameter 'debug' expects a number");
    expect(thrown(() => debug("18446744073709551616")).message).toBe(
      "Value '18446744073709551616' is too large for parameter 'debug'",
    );
    expect(parseGlusterOptions({ filename: "gluster://h/v/a", logfile: "/l" }).logfile).toBe("/l");
    expect(parseGlusterOptions({ filename: "gluster://h/v/a" })).not.toHaveProperty("debug");
  });

  it("reports JSON syntax errors and json: without a gluster node", () => {
    expect(thrown(() => parseGlusterOptions("json:{bad")).message).toMatch(
      /^Could not parse the JSON options: /,
    );
    expect(thrown(() => parseGlusterOptions('json:{"driver":"raw"}')).message).toMatch(/no gluster node/);
    expect(
      parseGlusterOptions('json:{"driver":"raw","file.driver":"gluster","file.filename":"gluster://h/v/a"}')
        .volume,
    ).toBe("v");
  });
});

describe("GlusterError", () => {
  it("is a BlkError with QEMU's hint lines apart", () => {
    const e = thrown(() =>
      validateGlusterOptions({ volume: "v", path: "p", server: [{ type: "inet", host: "h" }] }),
    );
    expect(e).toBeInstanceOf(BlkError);
    expect(e.name).toBe("BlkError");
    expect(e.message).toBe("Parameter 'port' is missing");
    expect(e.serverIndex).toBe(0);
    expect(e.usage).toBe(GLUSTER_JSON_USAGE);
    expect(e.hint?.split("\n")).toEqual(["hint: check in 'server' array index '0'", GLUSTER_JSON_USAGE]);
  });
  it("keeps the JSON Usage typo of QEMU", () => {
    expect(GLUSTER_JSON_USAGE).toContain("file.server.1.transport=unix");
  });
  it("is re-exported from the package root", () => {
    expect(root.parseGlusterUri).toBe(parseGlusterUri);
    expect(root.GlusterError).toBe(GlusterError);
  });
});
