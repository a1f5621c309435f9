/**
 * The gluster conformance vectors of /work/shared/spec/gluster-url.md (§3: 66 URI rows, §5: 32 JSON rows,
 * observed on qemu-img 7.2.22 + block-gluster.so), plus extra rows observed the same way on this machine's
 * qemu-img while writing the parser (`X…` ids). Abbreviated spec inputs (`V`, `…`) are written out in full.
 */
import {
  type BlockdevOptionsGluster,
  GLUSTER_JSON_USAGE,
  GLUSTER_RDMA_WARNING,
  GLUSTER_URI_USAGE,
} from "../src/gluster/index.ts";

/** What the parse stage gives, and what the connect-time stage (`resolveGlusterConnection`) then says. */
export type Expected =
  | { ok: BlockdevOptionsGluster; warnings?: readonly string[]; connectError?: string }
  | { error: string; hint?: string; serverIndex?: number; warnings?: readonly string[] };

/** One row: spec id, input, expected result. */
export interface Vector {
  id: string;
  input: string;
  expected: Expected;
}

const inet = (host: string, port: string, volume: string, path: string): Expected => ({
  ok: { volume, path, server: [{ type: "inet", host, port }] },
});
const unix = (socket: string, volume: string, path: string): Expected => ({
  ok: { volume, path, server: [{ type: "unix", path: socket }] },
});
const invalid = (uri: string): Expected => ({ error: `invalid URI ${uri}`, hint: GLUSTER_URI_USAGE });
const unknown = (protocol: string): Expected => ({ error: `Unknown protocol '${protocol}'` });

/** §3: rows whose expected value depends only on the input. */
const uriRows: [number, string, (input: string) => Expected][] = [
  [1, "gluster://127.0.0.1/testvol/a.img", () => inet("127.0.0.1", "24007", "testvol", "a.img")],
  [2, "gluster+tcp://127.0.0.1/testvol/a.img", () => inet("127.0.0.1", "24007", "testvol", "a.img")],
  [
    3,
    "gluster+tcp://127.0.0.1:24008/testvol/dir/a.img",
    () => inet("127.0.0.1", "24008", "testvol", "dir/a.img"),
  ],
  [4, "gluster+tcp://[::1]/testvol/dir/a.img", () => inet("[::1]", "24007", "testvol", "dir/a.img")],
  [5, "gluster+tcp://[::1]:24009/testvol/dir/a.img", () => inet("[::1]", "24009", "testvol", "dir/a.img")],
  [
    6,
    "gluster+unix:///testvol/dir/a.img?socket=/tmp/glusterd.socket",
    () => unix("/tmp/glusterd.socket", "testvol", "dir/a.img"),
  ],
  [
    7,
    "gluster+rdma://127.0.0.1:24010/testvol/a.img",
    () => ({ ...inet("127.0.0.1", "24010", "testvol", "a.img"), warnings: [GLUSTER_RDMA_WARNING] }),
  ],
  [8, "gluster:///testvol/a.img", () => inet("localhost", "24007", "testvol", "a.img")],
  [9, "gluster:testvol/a.img", () => inet("localhost", "24007", "testvol", "a.img")],
  [10, "gluster+tcp://localhost/testvol/a.img", () => inet("localhost", "24007", "testvol", "a.img")],
  [11, "gluster://127.0.0.1//testvol//dir//a.img", () => inet("127.0.0.1", "24007", "testvol", "dir//a.img")],
  [12, "gluster://127.0.0.1/testvol/./a.img", () => inet("127.0.0.1", "24007", "testvol", "./a.img")],
  [13, "gluster://127.0.0.1/testvol/../a.img", () => inet("127.0.0.1", "24007", "testvol", "../a.img")],
  [14, "gluster://127.0.0.1/testvol/a.img/", () => inet("127.0.0.1", "24007", "testvol", "a.img/")],
  [
    15,
    "gluster://127.0.0.1/testvol/dir/sub/a.qcow2",
    () => inet("127.0.0.1", "24007", "testvol", "dir/sub/a.qcow2"),
  ],
  [16, "gluster://127.0.0.1:0/testvol/a.img", () => inet("127.0.0.1", "24007", "testvol", "a.img")],
  [17, "gluster://127.0.0.1:65535/testvol/a.img", () => inet("127.0.0.1", "65535", "testvol", "a.img")],
  [18, "gluster://127.0.0.1:024008/testvol/a.img", () => inet("127.0.0.1", "24008", "testvol", "a.img")],
  [19, "gluster://user@127.0.0.1/testvol/a.img", () => inet("127.0.0.1", "24007", "testvol", "a.img")],
  [20, "gluster://127.0.0.1/testvol/a.img#frag", () => inet("127.0.0.1", "24007", "testvol", "a.img")],
  [21, "gluster://127.0.0.1/testvol/a.img?", () => inet("127.0.0.1", "24007", "testvol", "a.img")],
  [22, "gluster://127.0.0.1/testvol/a.img?&", () => inet("127.0.0.1", "24007", "testvol", "a.img")],
  [
    23,
    "gluster://[::ffff:127.0.0.1]:24011/testvol/a.img",
    () => inet("[::ffff:127.0.0.1]", "24011", "testvol", "a.img"),
  ],
  [
    24,
    "gluster://[fe80::1%25lo]:24026/testvol/a.img",
    () => inet("[fe80::1%lo]", "24026", "testvol", "a.img"),
  ],
  [
    25,
    "gluster://host_with_underscore/testvol/a.img",
    () => inet("host_with_underscore", "24007", "testvol", "a.img"),
  ],
  [26, "gluster://127.0.0.1/%74estvol/a.img", () => inet("127.0.0.1", "24007", "testvol", "a.img")],
  [27, "gluster://127.0.0.1/testvol%2Fa.img", () => inet("127.0.0.1", "24007", "testvol", "a.img")],
  [28, "gluster://127.0.0.1/testvol/a%2Fb.img", () => inet("127.0.0.1", "24007", "testvol", "a/b.img")],
  [29, "gluster+unix:/testvol/a.img?socket=/tmp/s", () => unix("/tmp/s", "testvol", "a.img")],
  [30, "gluster+unix:////testvol/a.img?socket=/tmp/s", () => unix("/tmp/s", "testvol", "a.img")],
  [31, "gluster+unix:///testvol/dir/?socket=/tmp/s", () => unix("/tmp/s", "testvol", "dir/")],
  [32, "gluster+unix:///testvol/a.img?socket=", () => unix("", "testvol", "a.img")],
  [33, "gluster+unix:///testvol/a.img?socket=relative.sock", () => unix("relative.sock", "testvol", "a.img")],
  [
    34,
    "gluster+unix:///testvol/a.img?socket=/tmp/a%20b.sock",
    () => unix("/tmp/a b.sock", "testvol", "a.img"),
  ],
  [35, "gluster+unix:///testvol/a.img?socket=/tmp/s#x", () => unix("/tmp/s", "testvol", "a.img")],
  [
    36,
    "gluster://127.0.0.1/test%20vol/a%20b.img",
    (i) => ({
      ...inet("127.0.0.1", "24007", "test vol", "a b.img"),
      connectError: `Could not open '${i}': Invalid argument`,
    }),
  ],
  [37, "gluster+unix:///testvol/a.img?socket", (i) => ({ error: `Could not open '${i}': Invalid argument` })],
  [38, "gluster://127.0.0.1/testvol", invalid],
  [39, "gluster://127.0.0.1/testvol/", invalid],
  [40, "gluster://127.0.0.1/", invalid],
  [41, "gluster://127.0.0.1", invalid],
  [42, "gluster://127.0.0.1:24007", invalid],
  [43, "gluster+unix:///a.img?socket=/tmp/s", invalid],
  [44, "gluster://127.0.0.1/testvol/a.img?socket=/tmp/s", invalid],
  [45, "gluster://127.0.0.1/testvol/a.img?socket=", invalid],
  [46, "gluster://127.0.0.1/testvol/a.img?foo", invalid],
  [47, "gluster://127.0.0.1/testvol/a.img?socket=/tmp/s&x=y", invalid],
  [48, "gluster+unix:///testvol/a.img", invalid],
  [49, "gluster+unix://127.0.0.1/testvol/a.img?socket=/tmp/s", invalid],
  [50, "gluster+unix://:24007/testvol/a.img?socket=/tmp/s", invalid],
  [51, "gluster+unix://[::1]/testvol/a.img?socket=/tmp/s", invalid],
  [52, "gluster+unix:///testvol/a.img?sock=/tmp/s", invalid],
  [53, "gluster+unix:///testvol/a.img?SOCKET=/tmp/s", invalid],
  [54, "gluster+unix:///testvol/a.img?socket=/tmp/s&socket=/tmp/t", invalid],
  [55, "gluster+unix:///testvol/a.img?socket=/tmp/s&foo=bar", invalid],
  [56, "gluster://127.0.0.1:65536/testvol/a.img", invalid],
  [57, "gluster://127.0.0.1:99999/testvol/a.img", invalid],
  [58, "gluster://127.0.0.1:abc/testvol/a.img", invalid],
  [59, "gluster://127.0.0.1:/testvol/a.img", invalid],
  [60, "gluster://127.0.0.1:-1/testvol/a.img", invalid],
  [61, "gluster://[::1/testvol/a.img", invalid],
  [62, "gluster://::1/testvol/a.img", invalid],
  [63, "gluster+foo://127.0.0.1/testvol/a.img", () => unknown("gluster+foo")],
  [64, "glusterfs://127.0.0.1/testvol/a.img", () => unknown("glusterfs")],
  [65, "gluster+TCP://127.0.0.1/testvol/a.img", () => unknown("gluster+TCP")],
  [66, "GLUSTER://127.0.0.1/testvol/a.img", () => unknown("GLUSTER")],
];

/** §3, all 66 rows. */
export const URI_VECTORS: readonly Vector[] = uriRows.map(([n, input, f]) => ({
  id: String(n),
  input,
  expected: f(input),
}));

/** Extra URI rows observed on qemu-img 7.2.22 here (QEMU quirks the spec does not list). */
export const URI_EXTRA_VECTORS: readonly Vector[] = (
  [
    // rdma warns before the URI is rejected
    ["X1", "gluster+rdma://127.0.0.1/testvol", (i) => ({ ...invalid(i), warnings: [GLUSTER_RDMA_WARNING] })],
    // QEMU's IPv4 branch never matches, so any reg-name is a host
    ["X2", "gluster://127.0.0.1x/testvol/a.img", () => inet("127.0.0.1x", "24007", "testvol", "a.img")],
    ["X3", "gluster://1.2.3.2560/testvol/a.img", () => inet("1.2.3.2560", "24007", "testvol", "a.img")],
    // anything but ']' goes inside brackets
    ["X4", "gluster://[a b]/testvol/a.img", () => inet("[a b]", "24007", "testvol", "a.img")],
    // "=value" sections are dropped; a lone "=" is a parameter
    ["X5", "gluster://127.0.0.1/testvol/a.img?=x", () => inet("127.0.0.1", "24007", "testvol", "a.img")],
    ["X6", "gluster://127.0.0.1/testvol/a.img?=", invalid],
    ["X7", "gluster+unix:///testvol/a.img?=&socket=x", invalid],
    // the parameter name is decoded; ';' separates when there is no '&'
    ["X8", "gluster+unix:///testvol/a.img?%73ocket=/tmp/s", () => unix("/tmp/s", "testvol", "a.img")],
    ["X9", "gluster+unix:///testvol/a.img?socket=/tmp/s;x=y", invalid],
    // unix: ':0' is no port, userinfo is no host
    ["X10", "gluster+unix://:0/testvol/a.img?socket=/tmp/s", () => unix("/tmp/s", "testvol", "a.img")],
    ["X11", "gluster+unix://user@/testvol/a.img?socket=/tmp/s", () => unix("/tmp/s", "testvol", "a.img")],
    // decoded NUL ends the value (C strings)
    ["X12", "gluster://127.0.0.1/testvol/a%00b.img", () => inet("127.0.0.1", "24007", "testvol", "a")],
    ["X13", "gluster://%00/testvol/a.img", () => inet("", "24007", "testvol", "a.img")],
    // raw non-ASCII is no pchar; escaped UTF-8 is decoded
    ["X14", "gluster://127.0.0.1/testvol/é.img", invalid],
    ["X15", "gluster://127.0.0.1/testvol/a%C3%A9.img", () => inet("127.0.0.1", "24007", "testvol", "aé.img")],
    // fragments: one '#', brackets allowed
    ["X16", "gluster://127.0.0.1/testvol/a.img#a#b", invalid],
    ["X17", "gluster://127.0.0.1/testvol/a.img#[x]", () => inet("127.0.0.1", "24007", "testvol", "a.img")],
    // protocol lookup: empty name, 127-byte buffer
    ["X18", ":foo", () => unknown("")],
    ["X19", `gluster${"x".repeat(140)}://h/v/a`, () => unknown(`gluster${"x".repeat(120)}`)],
    // no protocol prefix: QEMU's scheme-less URI parse (as for a JSON `filename`)
    ["X20", "/testvol/a.img", () => inet("localhost", "24007", "testvol", "a.img")],
    ["X21", "testvol/a.img", () => inet("localhost", "24007", "testvol", "a.img")],
    ["X22", "", invalid],
    // libgfapi volume names: letters, digits, '_' and '-'
    [
      "X23",
      "gluster://h/a.b/x",
      (i) => ({ ...inet("h", "24007", "a.b", "x"), connectError: `Could not open '${i}': Invalid argument` }),
    ],
    ["X24", "gluster://h/a_b-C9/x", () => inet("h", "24007", "a_b-C9", "x")],
  ] as [string, string, (input: string) => Expected][]
).map(([id, input, f]) => ({ id, input, expected: f(input) }));

const J = GLUSTER_JSON_USAGE;
const V = '"driver":"gluster","volume":"testvol","path":"a.img"';
const S = '{"type":"inet","host":"127.0.0.1","port":"24007"}';
const ok = (server: BlockdevOptionsGluster["server"], volume = "testvol", path = "a.img"): Expected => ({
  ok: { volume, path, server },
});
const jerr = (error: string, serverIndex?: number): Expected =>
  serverIndex === undefined
    ? { error, hint: J }
    : { error, serverIndex, hint: `hint: check in 'server' array index '${serverIndex}'\n${J}` };
const portErr = (port: string, server: BlockdevOptionsGluster["server"]): Expected => ({
  ...ok(server),
  connectError: `'${port}' is not a valid port number`,
});

/** §5, all 32 rows; `input` is the JSON text (qemu-img gets it with a `json:` prefix). */
export const JSON_VECTORS: readonly Vector[] = (
  [
    [
      "J1",
      '{"driver":"gluster","volume":"testvol","path":"/a.img","server":[{"type":"inet","host":"127.0.0.1","port":"24012"}]}',
      ok([{ type: "inet", host: "127.0.0.1", port: "24012" }], "testvol", "/a.img"),
    ],
    [
      "J2",
      `{${V},"server":[{"type":"tcp","host":"127.0.0.1","port":"24013"}]}`,
      ok([{ type: "inet", host: "127.0.0.1", port: "24013" }]),
    ],
    [
      "J3",
      `{${V},"server":[{"type":"unix","path":"/tmp/g.sock"}]}`,
      ok([{ type: "unix", path: "/tmp/g.sock" }]),
    ],
    [
      "J4",
      `{${V},"server":[{"type":"unix","socket":"/tmp/g.sock"}]}`,
      ok([{ type: "unix", path: "/tmp/g.sock" }]),
    ],
    [
      "J5",
      `{${V},"server":[{"type":"inet","host":"::1","port":"24015"}]}`,
      ok([{ type: "inet", host: "::1", port: "24015" }]),
    ],
    [
      "J6",
      `{${V},"server":[{"type":"inet","host":"127.0.0.1","port":24018}]}`,
      ok([{ type: "inet", host: "127.0.0.1", port: "24018" }]),
    ],
    [
      "J7",
      `{${V},"server":[{"type":"inet","host":"127.0.0.1","port":"0"}]}`,
      ok([{ type: "inet", host: "127.0.0.1", port: "0" }]),
    ],
    [
      "J8",
      `{${V},"server":[{"type":"inet","host":"127.0.0.1","port":"24014"},{"type":"unix","path":"/tmp/g2.sock"}]}`,
      ok([
        { type: "inet", host: "127.0.0.1", port: "24014" },
        { type: "unix", path: "/tmp/g2.sock" },
      ]),
    ],
    [
      "J9",
      `{${V},"server":{"0":{"type":"inet","host":"127.0.0.1","port":"24020"}}}`,
      ok([{ type: "inet", host: "127.0.0.1", port: "24020" }]),
    ],
    [
      "J10",
      '{"driver":"gluster","filename":"gluster://127.0.0.1:24016/testvol/a.img"}',
      ok([{ type: "inet", host: "127.0.0.1", port: "24016" }]),
    ],
    [
      "J11",
      `{${V},"server":[{"type":"inet","host":"127.0.0.1","port":"24024"}],"filename":"gluster://127.0.0.1:24025/w/b.img"}`,
      ok([{ type: "inet", host: "127.0.0.1", port: "24025" }], "w", "b.img"),
    ],
    [
      "J12",
      '{"driver":"gluster","volume":"","path":"","server":[{"type":"inet","host":"127.0.0.1","port":"24019"}]}',
      ok([{ type: "inet", host: "127.0.0.1", port: "24019" }], "", ""),
    ],
    ["J13", `{${V},"server":[{"type":"inet","host":"127.0.0.1"}]}`, jerr("Parameter 'port' is missing", 0)],
    ["J14", `{${V},"server":[{"type":"inet","port":"24007"}]}`, jerr("Parameter 'host' is missing", 0)],
    ["J15", `{${V},"server":[{"host":"127.0.0.1","port":"24007"}]}`, jerr("Parameter 'type' is missing", 0)],
    [
      "J16",
      `{${V},"server":[{"type":"vsock","cid":"3","port":"1"}]}`,
      jerr("Parameter 'type' may be 'inet' or 'unix'", 0),
    ],
    ["J17", `{${V},"server":[{"type":"fd","str":"3"}]}`, jerr("Parameter 'type' may be 'inet' or 'unix'", 0)],
    [
      "J18",
      `{${V},"server":[{"type":"INET","host":"127.0.0.1","port":"24007"}]}`,
      jerr("Parameter 'type' may be 'inet' or 'unix'", 0),
    ],
    [
      "J19",
      `{${V},"server":[{"type":"unix","path":"/tmp/a","socket":"/tmp/b"}]}`,
      jerr("Conflicting parameters 'path' and 'socket'", 0),
    ],
    ["J20", `{${V},"server":[{"type":"unix"}]}`, jerr("Parameter 'path' is missing", 0)],
    [
      "J21",
      `{${V},"server":[{"type":"inet","host":"127.0.0.1","port":"24007","to":"24010"}]}`,
      jerr("Parameter 'to' not supported"),
    ],
    [
      "J22",
      `{${V},"server":[{"type":"inet","host":"127.0.0.1","port":"24007","ipv4":"on"}]}`,
      jerr("Parameters 'ipv4/ipv6' not supported"),
    ],
    ["J23", '{"driver":"gluster","volume":"testvol","path":"a.img"}', jerr("Parameter 'server' is missing")],
    ["J24", `{${V},"server":[]}`, jerr("Parameter 'server' is missing")],
    ["J25", `{"driver":"gluster","path":"a.img","server":[${S}]}`, jerr("Parameter 'volume' is missing")],
    ["J26", `{"driver":"gluster","volume":"testvol","server":[${S}]}`, jerr("Parameter 'path' is missing")],
    [
      "J27",
      `{${V},"server":[{"type":"inet","host":"127.0.0.1","port":"abc"}]}`,
      portErr("abc", [{ type: "inet", host: "127.0.0.1", port: "abc" }]),
    ],
    [
      "J28",
      `{${V},"server":[{"type":"inet","host":"127.0.0.1","port":"70000"}]}`,
      portErr("70000", [{ type: "inet", host: "127.0.0.1", port: "70000" }]),
    ],
    [
      "J29",
      `{${V},"server":[{"type":"inet","host":"127.0.0.1","port":""}]}`,
      portErr("", [{ type: "inet", host: "127.0.0.1", port: "" }]),
    ],
    [
      "J30",
      `{${V},"server":[{"type":"inet","host":"127.0.0.1","port":"+5"}]}`,
      ok([{ type: "inet", host: "127.0.0.1", port: "+5" }]),
    ],
    [
      "J31",
      `{${V},"server":[{"type":"inet","host":"127.0.0.1","port":"1"},{"type":"inet","host":"127.0.0.1"}]}`,
      jerr("Parameter 'port' is missing", 1),
    ],
    [
      "J32",
      '{"file":{"driver":"gluster","volume":"testvol","path":"a.qcow2","server":[{"type":"inet","host":"127.0.0.1","port":"24017"}]},"driver":"qcow2"}',
      ok([{ type: "inet", host: "127.0.0.1", port: "24017" }], "testvol", "a.qcow2"),
    ],
  ] as [string, string, Expected][]
).map(([id, input, expected]) => ({ id, input, expected }));

/** Extra JSON rows observed on qemu-img 7.2.22 here. */
export const JSON_EXTRA_VECTORS: readonly Vector[] = (
  [
    // QemuOpts value types, checked while absorbing (before host/port), in QDict order
    ["XJ1", `{${V},"server":[{"type":"inet","to":"x"}]}`, jerr("Parameter 'to' expects a number")],
    [
      "XJ2",
      `{${V},"server":[{"type":"inet","host":"h","port":"1","to":"x","ipv4":"maybe","ipv6":"maybe"}]}`,
      jerr("Parameter 'ipv6' expects 'on' or 'off'"),
    ],
    [
      "XJ3",
      `{${V},"server":[{"type":"inet","host":"h","port":"1","to":"99999999999999999999999"}]}`,
      jerr("Value '99999999999999999999999' is too large for parameter 'to'"),
    ],
    [
      "XJ4",
      `{${V},"server":[{"type":"inet","host":"h","port":"1","to":"0x10"}]}`,
      jerr("Parameter 'to' not supported"),
    ],
    [
      "XJ5",
      `{${V},"server":[{"type":"inet","host":"h","port":"1","ipv4":"y"}]}`,
      jerr("Parameters 'ipv4/ipv6' not supported"),
    ],
    // scalars as QEMU prints them
    [
      "XJ6",
      `{${V},"server":[{"type":"inet","host":"h","port":true}]}`,
      portErr("on", [{ type: "inet", host: "h", port: "on" }]),
    ],
    [
      "XJ7",
      `{${V},"server":[{"type":"inet","host":"h","port":0.1}]}`,
      portErr("0.10000000000000001", [{ type: "inet", host: "h", port: "0.10000000000000001" }]),
    ],
    [
      "XJ8",
      `{${V},"server":[{"type":"inet","host":"h","port":1e20}]}`,
      portErr("1e+20", [{ type: "inet", host: "h", port: "1e+20" }]),
    ],
    ["XJ9", `{${V},"server":[{"type":5}]}`, jerr("Parameter 'type' may be 'inet' or 'unix'", 0)],
    [
      "XJ10",
      '{"driver":"gluster","volume":5,"path":true,"server":[{"type":"unix","path":"/s"}]}',
      ok([{ type: "unix", path: "/s" }], "5", "on"),
    ],
    // array shape: non-object entries, gaps, stray keys
    [
      "XJ11",
      `{${V},"server":[{"type":"inet","host":"h","port":"1"},5]}`,
      jerr("Parameter 'type' is missing", 1),
    ],
    ["XJ12", `{${V},"server":[{}]}`, jerr("Parameter 'type' is missing", 0)],
    [
      "XJ13",
      `{${V},"server":{"0":{"type":"unix","path":"/s"},"2":{"type":"unix","path":"/s"}}}`,
      jerr("Parameter 'server' is missing"),
    ],
    ["XJ14", `{${V},"server":{"1":{"type":"unix","path":"/s"}}}`, jerr("Parameter 'server' is missing")],
    [
      "XJ15",
      `{${V},"server":{"0":{"type":"unix","path":"/s"},"x":1}}`,
      jerr("Parameter 'server' is missing"),
    ],
    // non-scalars count as absent
    [
      "XJ16",
      '{"driver":"gluster","volume":{},"path":"a","server":[{"type":"unix","path":"/s"}]}',
      jerr("Parameter 'volume' is missing"),
    ],
    [
      "XJ17",
      '{"driver":"gluster","volume":null,"path":"a","server":[{"type":"unix","path":"/s"}]}',
      jerr("Parameter 'volume' is missing"),
    ],
    // filename wins, any scalar; a scheme is only checked by the URI parser
    ["XJ18", '{"driver":"gluster","filename":5}', invalid("5")],
    [
      "XJ19",
      '{"driver":"gluster","filename":"GLUSTER://127.0.0.1/testvol/a.img"}',
      invalid("GLUSTER://127.0.0.1/testvol/a.img"),
    ],
    [
      "XJ20",
      '{"driver":"gluster","filename":"/testvol/a.img"}',
      inet("localhost", "24007", "testvol", "a.img"),
    ],
    [
      "XJ21",
      '{"driver":"gluster","filename":"gluster+unix:///testvol/a.img?socket"}',
      { error: "Could not open 'gluster+unix:///testvol/a.img?socket': Invalid argument" },
    ],
    // debug is checked by the open step, before the dispatch and without a Usage hint
    ["XJ22", `{${V},"debug":"x","server":[${S}]}`, { error: "Parameter 'debug' expects a number" }],
    ["XJ23", '{"driver":"gluster","debug":"x"}', { error: "Parameter 'debug' expects a number" }],
    // unknown keys are ignored; ports are checked in server order at connect time
    [
      "XJ24",
      `{${V},"server":[{"type":"unix","path":"/s"}],"unknownkey":1}`,
      ok([{ type: "unix", path: "/s" }]),
    ],
    [
      "XJ25",
      `{${V},"server":[{"type":"unix","path":"/s"},{"type":"inet","host":"h","port":"x"}]}`,
      portErr("x", [
        { type: "unix", path: "/s" },
        { type: "inet", host: "h", port: "x" },
      ]),
    ],
    [
      "XJ26",
      `{${V},"server":[{"type":"inet","host":"h","port":"x"},{"type":"inet","host":"h"}]}`,
      jerr("Parameter 'port' is missing", 1),
    ],
    // libgfapi refuses the volume name; QEMU's block layer words the error
    [
      "XJ27",
      '{"driver":"gluster","volume":"a b","path":"x","server":[{"type":"unix","path":"/s"}]}',
      {
        ...ok([{ type: "unix", path: "/s" }], "a b", "x"),
        connectError: "Could not open image: Invalid argument",
      },
    ],
    // json: framing
    ["XJ28", "[1]", { error: "Invalid JSON object given" }],
    // a scheme-less filename may still have an authority
    ["XJ29", '{"driver":"gluster","filename":"//h:24009/v/a"}', inet("h", "24009", "v", "a")],
    ["XJ30", '{"driver":"gluster","filename":"//[::1/v/a"}', invalid("//[::1/v/a")],
  ] as [string, string, Expected][]
).map(([id, input, expected]) => ({ id, input, expected }));
