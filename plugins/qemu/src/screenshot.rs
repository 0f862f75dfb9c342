//! QEMU's `screendump` writes binary PPM (P6); the registry's `Image` is PNG.

use capvirt_plugin_api::PluginError;

/// A decoded PPM: width, height and 8-bit RGB pixels.
pub struct Rgb {
    pub width: u32,
    pub height: u32,
    pub pixels: Vec<u8>,
}

/// Parses a binary PPM with `maxval` 255 (what QEMU writes).
pub fn parse_ppm(bytes: &[u8]) -> Result<Rgb, PluginError> {
    let bad = |why: &str| PluginError::driver_failure(format!("QEMU's screen dump is not a usable PPM: {why}"));
    if bytes.get(..2) != Some(b"P6") {
        return Err(bad("not a P6 file"));
    }
    let mut header = Header { bytes, pos: 2 };
    let mut number = |what: &str| header.number().ok_or_else(|| bad(&format!("missing {what}")));
    let width = number("width")?;
    let height = number("height")?;
    let maxval = number("maxval")?;
    if maxval != 255 {
        return Err(bad(&format!("maxval {maxval}")));
    }
    if width == 0 || height == 0 || width > 16384 || height > 16384 {
        return Err(bad(&format!("size {width}x{height}")));
    }
    // Exactly one whitespace byte separates the header from the pixels.
    let data_start = header.pos + 1;
    let len = width as usize * height as usize * 3;
    let pixels = bytes.get(data_start..data_start + len).ok_or_else(|| bad("truncated pixel data"))?.to_vec();
    Ok(Rgb { width, height, pixels })
}

/// A cursor over a PPM header: whitespace-separated decimal numbers, `#` comments.
struct Header<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl Header<'_> {
    fn number(&mut self) -> Option<u32> {
        loop {
            while self.bytes.get(self.pos).is_some_and(u8::is_ascii_whitespace) {
                self.pos += 1;
            }
            if self.bytes.get(self.pos) != Some(&b'#') {
                break;
            }
            while self.bytes.get(self.pos).is_some_and(|&b| b != b'\n') {
                self.pos += 1;
            }
        }
        let start = self.pos;
        while self.bytes.get(self.pos).is_some_and(u8::is_ascii_digit) {
            self.pos += 1;
        }
        std::str::from_utf8(&self.bytes[start..self.pos]).ok()?.parse().ok()
    }
}

/// Encodes RGB pixels as PNG.
pub fn to_png(image: &Rgb) -> Result<Vec<u8>, PluginError> {
    let mut png = Vec::new();
    let mut encoder = png::Encoder::new(&mut png, image.width, image.height);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let encode = |encoder: png::Encoder<'_, &mut Vec<u8>>| -> Result<(), png::EncodingError> {
        let mut writer = encoder.write_header()?;
        writer.write_image_data(&image.pixels)?;
        writer.finish()
    };
    encode(encoder).map_err(|e| PluginError::internal(format!("PNG encoding failed: {e}")))?;
    Ok(png)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_qemu_style_ppm() {
        let mut ppm = b"P6\n2 1 255\n".to_vec();
        ppm.extend_from_slice(&[255, 0, 0, 0, 0, 255]);
        let image = parse_ppm(&ppm).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((image.width, image.height), (2, 1));
        assert_eq!(image.pixels, vec![255, 0, 0, 0, 0, 255]);
        let png = to_png(&image).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(&png[1..4], b"PNG");
    }

    #[test]
    fn refuses_truncated_or_foreign_data() {
        assert!(parse_ppm(b"P6\n2 2 255\n\0\0\0").is_err());
        assert!(parse_ppm(b"P5\n1 1 255\n\0").is_err());
        assert!(parse_ppm(b"").is_err());
    }
}
