/**
 * NBD URI conformance table: QEMU 7.2's accepted and refused forms (shared/spec/nbd.md §14.2), plus the
 * standard's export-name rules (§14.1).
 */
import { isBlkError } from "@blk/core";
import { describe, expect, it } from "vitest";
import { formatNbdUri, type NbdUriOptions, parseNbdUri } from "../src/nbd/client/index.ts";

const inet = (host: string, port: string, name?: string): NbdUriOptions =>
  name === undefined
    ? { server: { type: "inet", host, port } }
    : { server: { type: "inet", host, port }, export: name };
const unix = (path: string, name?: string): NbdUriOptions =>
  name === undefined ? { server: { type: "unix", path } } : { server: { type: "unix", path }, export: name };

const accepted: [string, NbdUriOptions, string][] = [
  ["nbd://127.0.0.1:10899/exp1", inet("127.0.0.1", "10899", "exp1"), "nbd://127.0.0.1:10899/exp1"],
  ["nbd+tcp://127.0.0.1:10899/exp1", inet("127.0.0.1", "10899", "exp1"), "nbd://127.0.0.1:10899/exp1"],
  [
    "nbd+unix:///exp1?socket=/tmp/nbdw/q.sock",
    unix("/tmp/nbdw/q.sock", "exp1"),
    "nbd+unix:///exp1?socket=/tmp/nbdw/q.sock",
  ],
  [
    "nbd:unix:/tmp/nbdw/q.sock:exportname=exp1",
    unix("/tmp/nbdw/q.sock", "exp1"),
    "nbd+unix:///exp1?socket=/tmp/nbdw/q.sock",
  ],
  ["nbd:127.0.0.1:10899:exportname=exp1", inet("127.0.0.1", "10899", "exp1"), "nbd://127.0.0.1:10899/exp1"],
  ["nbd:127.0.0.1:10899", inet("127.0.0.1", "10899"), "nbd://127.0.0.1:10899"],
  ["nbd://[::1]:10898//slash", inet("::1", "10898", "/slash"), "nbd://::1:10898//slash"],
  ["nbd://[::1]:10898/%2Fslash", inet("::1", "10898", "/slash"), "nbd://::1:10898//slash"],
  ["nbd://127.0.0.1/exp1", inet("127.0.0.1", "10809", "exp1"), "nbd://127.0.0.1:10809/exp1"],
  ["nbd://127.0.0.1:10899/", inet("127.0.0.1", "10899"), "nbd://127.0.0.1:10899"],
  ["nbd://127.0.0.1:10899", inet("127.0.0.1", "10899"), "nbd://127.0.0.1:10899"],
  ["nbd://h/hello%20world", inet("h", "10809", "hello world"), "nbd://h:10809/hello world"],
  ["nbd://h/disk", inet("h", "10809", "disk"), "nbd://h:10809/disk"],
  ["nbd+unix:///?socket=/s", unix("/s"), "nbd+unix://?socket=/s"],
  ["nbd+unix://?socket=/s", unix("/s"), "nbd+unix://?socket=/s"],
  ["nbd+unix:///x?socket=/a%20b", unix("/a b", "x"), "nbd+unix:///x?socket=/a b"],
  ["NBD://h:1/x", inet("h", "1", "x"), "nbd://h:1/x"],
];

const refused: [string, string][] = [
  ["nbd:///exp1", "EINVAL"],
  ["nbd+unix:///exp1", "EINVAL"],
  ["nbd+unix://localhost/exp1?socket=/tmp/s", "EINVAL"],
  ["nbd+unix:///exp1?socket=/tmp/s&x=1", "EINVAL"],
  ["nbd+unix:///exp1?sock=/tmp/s", "EINVAL"],
  ["nbd+unix:///exp1?socket=", "EINVAL"],
  ["nbd://h:10899/e?foo=bar", "EINVAL"],
  ["nbd://127.0.0.1:99999/exp1", "EINVAL"],
  ["nbd://h:12ab/e", "EINVAL"],
  ["nbd://h/%zz", "EINVAL"],
  ["nbd://[::1/e", "EINVAL"],
  ["nbds://127.0.0.1/exp1", "ENOTSUP"],
  ["nbds+unix:///e?socket=/s", "ENOTSUP"],
  ["nbd+vsock://1:2/e", "EINVAL"],
  ["http://h/e", "EINVAL"],
  ["not a uri", "EINVAL"],
  ["nbd:unix:", "EINVAL"],
  ["nbd:hostonly", "EINVAL"],
  ["nbd:h:70000", "EINVAL"],
];

describe("parseNbdUri", () => {
  it.each(accepted)("accepts %s", (uri, options, filename) => {
    expect(parseNbdUri(uri)).toEqual(options);
    expect(formatNbdUri(parseNbdUri(uri))).toBe(filename);
  });

  it.each(refused)("refuses %s with %s", (uri, code) => {
    let err: unknown;
    try {
      parseNbdUri(uri);
    } catch (e) {
      err = e;
    }
    expect(isBlkError(err)).toBe(true);
    expect((err as { code: string }).code).toBe(code);
  });

  it("uses QEMU's message for malformed URLs", () => {
    expect(() => parseNbdUri("nbd+unix:///exp1")).toThrow("No valid URL specified");
    expect(() => parseNbdUri("nbds://h/e")).toThrow("Unknown protocol 'nbds'");
  });
});
