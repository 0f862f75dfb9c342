//! A small, deterministic "display" for test domains.

use capvirt_plugin_api::{types::png_image, PluginError, Value};

pub const WIDTH: u32 = 64;
pub const HEIGHT: u32 = 48;

/// Renders a gradient tinted by the domain name, as PNG.
pub fn render(name: &str) -> Result<Value, PluginError> {
    let tint = name.bytes().fold(0u8, |acc, b| acc.wrapping_mul(31).wrapping_add(b));
    let mut pixels = Vec::with_capacity((WIDTH * HEIGHT * 3) as usize);
    for y in 0..HEIGHT {
        for x in 0..WIDTH {
            pixels.extend_from_slice(&[(x * 4) as u8, (y * 5) as u8, tint]);
        }
    }
    let mut png = Vec::new();
    let mut encoder = png::Encoder::new(&mut png, WIDTH, HEIGHT);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let encode = |encoder: png::Encoder<'_, &mut Vec<u8>>| -> Result<(), png::EncodingError> {
        let mut writer = encoder.write_header()?;
        writer.write_image_data(&pixels)?;
        writer.finish()
    };
    encode(encoder).map_err(|e| PluginError::internal(format!("PNG encoding failed: {e}")))?;
    Ok(png_image(u64::from(WIDTH), u64::from(HEIGHT), png))
}
