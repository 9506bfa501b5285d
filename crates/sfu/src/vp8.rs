//! The little of VP8 an SFU needs: is this packet the start of a keyframe, and how large is
//! the picture (RFC 7741 payload descriptor, RFC 6386 frame header).

/// Where the VP8 payload starts after the payload descriptor, if the descriptor is whole.
fn descriptor_len(p: &[u8]) -> Option<usize> {
    let first = *p.first()?;
    let mut len = 1;
    if first & 0x80 != 0 {
        let x = *p.get(1)?;
        len += 1;
        if x & 0x80 != 0 {
            // PictureID: 7 or 15 bits.
            let pic = *p.get(len)?;
            len += if pic & 0x80 != 0 { 2 } else { 1 };
        }
        if x & 0x40 != 0 {
            len += 1; // TL0PICIDX
        }
        if x & 0x30 != 0 {
            len += 1; // TID/Y/KEYIDX
        }
    }
    (p.len() > len).then_some(len)
}

/// The picture size if this payload starts a keyframe (first packet of partition 0).
pub(crate) fn keyframe_size(payload: &[u8]) -> Option<(u16, u16)> {
    let first = *payload.first()?;
    // S bit set and partition index 0.
    if first & 0x10 == 0 || first & 0x07 != 0 {
        return None;
    }
    let at = descriptor_len(payload)?;
    let frame = payload.get(at..)?;
    // Frame tag bit 0: 0 for a keyframe. Then the start code 9d 01 2a.
    if frame.len() < 10 || frame[0] & 0x01 != 0 || frame[3..6] != [0x9d, 0x01, 0x2a] {
        return None;
    }
    let width = u16::from_le_bytes([frame[6], frame[7]]) & 0x3fff;
    let height = u16::from_le_bytes([frame[8], frame[9]]) & 0x3fff;
    Some((width, height))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_keyframe_size_after_a_long_descriptor() {
        // X, S; I+L+T; 15-bit picture id; tl0; tid.
        let mut p = vec![0x90, 0xe0, 0x81, 0x23, 0x05, 0x40];
        p.extend_from_slice(&[
            0x50, 0x2a, 0x00, 0x9d, 0x01, 0x2a, 0x80, 0x02, 0xe0, 0x01, 0xff,
        ]);
        assert_eq!(keyframe_size(&p), Some((640, 480)));
    }

    #[test]
    fn interframes_and_continuations_are_not_keyframes() {
        let inter = [
            0x10, 0x51, 0x2a, 0x00, 0x9d, 0x01, 0x2a, 0x80, 0x02, 0xe0, 0x01,
        ];
        assert_eq!(keyframe_size(&inter), None);
        let cont = [
            0x00, 0x50, 0x2a, 0x00, 0x9d, 0x01, 0x2a, 0x80, 0x02, 0xe0, 0x01,
        ];
        assert_eq!(keyframe_size(&cont), None);
        assert_eq!(keyframe_size(&[]), None);
        assert_eq!(keyframe_size(&[0x90, 0xe0]), None);
    }
}
