// The README's example is this file's code between the markers (imports, then the body of "runs").
// "is the README's code" keeps the two in step.
// --- README imports start ---
import assert from "node:assert/strict";
import {
  formatGlusterUri,
  GlusterError,
  parseGlusterOptions,
  parseGlusterUri,
  resolveGlusterConnection,
} from "@blk/drivers/gluster";
// --- README imports end ---
import { describe, expect, it } from "vitest";

describe("README example", () => {
  it("runs", () => {
    // --- README body start ---
    // A URL, parsed as QEMU 7.2 parses it (the rdma warning comes through a callback, not the console).
    const warnings: string[] = [];
    const options = parseGlusterUri("gluster+rdma://[::1]:24010/testvol/dir/a.img", {
      onWarning: (w) => warnings.push(w),
    });
    assert.deepEqual(options, {
      volume: "testvol",
      path: "dir/a.img",
      server: [{ type: "inet", host: "[::1]", port: "24010" }],
    });
    assert.deepEqual(warnings, ["rdma feature is not supported, falling back to tcp"]);

    // The JSON form (legacy `socket` key), and back to a URL.
    const json = parseGlusterOptions({
      driver: "gluster",
      volume: "testvol",
      path: "a.img",
      server: [{ type: "unix", socket: "/run/glusterd.socket" }],
    });
    assert.equal(formatGlusterUri(json), "gluster+unix:///testvol/a.img?socket=/run/glusterd.socket");

    // Rejections carry QEMU's exact message, with its hint lines apart.
    assert.throws(
      () => parseGlusterUri("gluster://127.0.0.1/testvol"),
      (e) =>
        e instanceof GlusterError &&
        e.code === "EINVAL" &&
        e.message === "invalid URI gluster://127.0.0.1/testvol" &&
        e.hint?.startsWith("Usage: file=gluster[+transport]://") === true,
    );

    // JSON-form ports are checked where QEMU checks them: at connect time.
    const bad = parseGlusterOptions({
      volume: "testvol",
      path: "a.img",
      server: [{ type: "inet", host: "gluster1", port: "70000" }],
    });
    assert.throws(() => resolveGlusterConnection(bad), { message: "'70000' is not a valid port number" });
    // --- README body end ---
  });

  it("is the README's code", async () => {
    const { readFileSync } = await import("node:fs");
    const lines = (text: string, start: string, end: string): string[] =>
      text
        .slice(text.indexOf(start) + start.length, text.indexOf(end))
        .split("\n")
        .map((l) => l.trim())
        .filter((l) => l !== "");
    const source = readFileSync(new URL(import.meta.url), "utf8");
    const readme = readFileSync(new URL("../README.md", import.meta.url), "utf8");
    const code = [
      ...lines(source, "// --- README imports start ---", "// --- README imports end ---"),
      ...lines(source, "// --- README body start ---", "// --- README body end ---"),
    ];
    expect(lines(readme, "<!-- example:start -->\n```ts", "```\n<!-- example:end -->")).toEqual(code);
  });
});
