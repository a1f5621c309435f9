import { describe, expect, it } from "vitest";
import { getopt } from "../src/getopt.ts";
import { humanSize, parseSize } from "../src/size.ts";

describe("getopt", () => {
  const long = [
    { name: "output", hasArg: true },
    { name: "force-share", hasArg: false, key: "U" },
    { name: "backing-chain", hasArg: false },
  ];
  it("parses clustered and attached short options, long options and operands in any order", () => {
    const r = getopt(["a.img", "-qfraw", "--output=json", "-U", "--output", "human", "b"], "f:qU", long);
    expect(r.options).toEqual([
      { key: "q", value: "" },
      { key: "f", value: "raw" },
      { key: "output", value: "json" },
      { key: "U", value: "" },
      { key: "output", value: "human" },
    ]);
    expect(r.operands).toEqual(["a.img", "b"]);
  });
  it("takes unique long prefixes and keeps everything after -- as operands", () => {
    const r = getopt(["--back", "--", "-f", "x"], "f:", long);
    expect(r.options).toEqual([{ key: "backing-chain", value: "" }]);
    expect(r.operands).toEqual(["-f", "x"]);
    expect(getopt(["-"], "f:").operands).toEqual(["-"]);
  });
  it("rejects unknown options and missing arguments with qemu-img's words", () => {
    expect(() => getopt(["--bogus"], "f:", long)).toThrow("unrecognized option '--bogus'");
    expect(() => getopt(["-x"], "f:", long)).toThrow("unrecognized option '-x'");
    expect(() => getopt(["--force-share=1"], "f:", long)).toThrow("unrecognized option '--force-share=1'");
    expect(() => getopt(["-f"], "f:", long)).toThrow("missing argument for option '-f'");
    expect(() => getopt(["--output"], "f:", long)).toThrow("missing argument for option '--output'");
  });
});

describe("parseSize", () => {
  const ok = (s: string): bigint | string => {
    const r = parseSize(s);
    return r.ok ? r.value : r.error;
  };
  it("reads qemu-img's sizes (values checked against qemu-img create 7.2)", () => {
    expect(ok("1000")).toBe(1000n);
    expect(ok("1k")).toBe(1024n);
    expect(ok("1K")).toBe(1024n);
    expect(ok("1m")).toBe(1048576n);
    expect(ok("1g")).toBe(1n << 30n);
    expect(ok("1t")).toBe(1n << 40n);
    expect(ok("1b")).toBe(1n);
    expect(ok("1.5M")).toBe(1572864n);
    expect(ok("0.5k")).toBe(512n);
    expect(ok("1.0009k")).toBe(1025n);
    expect(ok("0.3k")).toBe(307n);
    expect(ok("0x10")).toBe(16n);
    expect(ok("010")).toBe(10n);
    expect(ok(" 1k")).toBe(1024n);
    expect(ok("8E")).toBe(1n << 63n);
  });
  it("refuses what qemu-img refuses", () => {
    for (const s of ["1.5", "0.1", "1kb", "1e3", "1KiB", "abc", "", "-5", "1.7b"])
      expect(ok(s)).toBe("invalid");
    expect(ok("16E")).toBe("range");
  });
});

describe("humanSize", () => {
  it("formats like qemu-img info (three significant digits, binary units)", () => {
    expect(humanSize(0)).toBe("0 B");
    expect(humanSize(1024)).toBe("1 KiB");
    expect(humanSize(4096)).toBe("4 KiB");
    expect(humanSize(73728)).toBe("72 KiB");
    expect(humanSize(331776)).toBe("324 KiB");
    expect(humanSize(1573888)).toBe("1.5 MiB");
    expect(humanSize(64 << 20)).toBe("64 MiB");
    expect(humanSize(1000 * 1024)).toBe("0.977 MiB");
    expect(humanSize(999)).toBe("999 B");
    expect(humanSize(1023)).toBe("0.999 KiB");
  });
});
