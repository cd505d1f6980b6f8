//! Arrays the kernel programs share with the agent: BPF array maps created
//! with `BPF_F_MMAPABLE` and mapped into the agent's memory, so reading
//! them costs no system call.

use std::{io, os::fd::BorrowedFd, ptr::NonNull, sync::atomic::AtomicU64};

/// An array of `T` shared with the kernel: a BPF array map created with
/// `BPF_F_MMAPABLE` and mapped here, or (in tests) memory of our own.
///
/// The map is mapped in chunks as they are first used: the kernel puts
/// every page of a mapping in place at once, so mapping all 8 MiB of the
/// switch logs would count them all in the agent's resident size although
/// a quiet node's logs never wrap (their records stay near the front).
pub struct SharedArray<T> {
    base: NonNull<T>,
    len: usize,
    /// The map's file descriptor (a duplicate of aya's), for chunks mapped
    /// later; none for memory of our own.
    map: Option<std::os::fd::OwnedFd>,
    /// Bytes reserved at `base` (unmapped when dropped; 0 if not ours).
    reserved_bytes: usize,
    /// Whether each chunk of `CHUNK_BYTES` is mapped yet.
    mapped: Vec<std::cell::Cell<bool>>,
    /// Our own memory (tests), kept alive here.
    _owned: Option<Box<[T]>>,
}

/// Bytes mapped at a time: 16 pages.
const CHUNK_BYTES: usize = 64 * 1024;

// SAFETY: the memory is shared with the kernel, which synchronises with
// atomics; the agent uses an array from one thread at a time.
unsafe impl<T: Send> Send for SharedArray<T> {}

impl<T: Copy + Default> SharedArray<T> {
    /// Reserves room for `len` elements of the array map behind `fd`; the
    /// map's pages are mapped into it as they are used.
    pub fn map(fd: BorrowedFd<'_>, len: usize) -> io::Result<Self> {
        assert!(
            size_of::<T>().is_multiple_of(8),
            "array elements are 8-byte aligned"
        );
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
        assert!(CHUNK_BYTES.is_multiple_of(page), "chunks are whole pages");
        let bytes = (len * size_of::<T>()).div_ceil(page).max(1) * page;
        // SAFETY: a fresh reservation of address space, inaccessible until
        // chunks of the map are mapped over it.
        let address = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if address == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let array = Self {
            base: NonNull::new(address.cast()).expect("mmap returned null"),
            len,
            map: Some(fd.try_clone_to_owned()?),
            reserved_bytes: bytes,
            mapped: (0..bytes.div_ceil(CHUNK_BYTES))
                .map(|_| std::cell::Cell::new(false))
                .collect(),
            _owned: None,
        };
        // The first chunk now, so that a map the kernel refuses to map fails
        // here, with its name, rather than at the first read.
        array.map_chunk(0)?;
        Ok(array)
    }

    /// `len` zeroed elements of our own memory, standing in for the kernel's.
    pub fn owned(len: usize) -> Self {
        let mut owned = vec![T::default(); len].into_boxed_slice();
        Self {
            base: NonNull::new(owned.as_mut_ptr()).expect("boxed slice"),
            len,
            map: None,
            reserved_bytes: 0,
            mapped: Vec::new(),
            _owned: Some(owned),
        }
    }

    /// A second view of the same memory, which frees nothing (tests play
    /// the kernel through it). It must not outlive `self`.
    #[cfg(test)]
    pub fn alias(&self) -> Self {
        Self {
            base: self.base,
            len: self.len,
            map: None,
            reserved_bytes: 0,
            mapped: Vec::new(),
            _owned: None,
        }
    }
}

impl<T> SharedArray<T> {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The element at `index`, if in bounds (and its pages could be
    /// mapped).
    pub fn at(&self, index: usize) -> Option<*mut T> {
        if index >= self.len {
            return None;
        }
        if self.map.is_some() {
            let first = index * size_of::<T>() / CHUNK_BYTES;
            let last = ((index + 1) * size_of::<T>() - 1) / CHUNK_BYTES;
            for chunk in first..=last {
                if !self.mapped[chunk].get()
                    && let Err(error) = self.map_chunk(chunk)
                {
                    tracing::warn!("mapping a chunk of a shared array: {error}");
                    return None;
                }
            }
        }
        // SAFETY: in bounds of the reservation, and mapped.
        Some(unsafe { self.base.as_ptr().add(index) })
    }

    /// Maps chunk `chunk` of the map over its place in the reservation.
    fn map_chunk(&self, chunk: usize) -> io::Result<()> {
        let Some(map) = &self.map else {
            return Ok(());
        };
        let offset = chunk * CHUNK_BYTES;
        let bytes = CHUNK_BYTES.min(self.reserved_bytes - offset);
        // SAFETY: replaces part of our own reservation (MAP_FIXED) with the
        // same range of the map's memory.
        let address = unsafe {
            libc::mmap(
                self.base.as_ptr().cast::<u8>().add(offset).cast(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_FIXED,
                std::os::fd::AsRawFd::as_raw_fd(map),
                offset as libc::off_t,
            )
        };
        if address == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        self.mapped[chunk].set(true);
        Ok(())
    }
}

impl<T> Drop for SharedArray<T> {
    fn drop(&mut self) {
        if self.reserved_bytes > 0 {
            // SAFETY: the reservation made in `map` (and the chunks mapped
            // over it), not used after this.
            unsafe { libc::munmap(self.base.as_ptr().cast(), self.reserved_bytes) };
        }
    }
}

pub fn u64_at(place: *mut u64) -> &'static AtomicU64 {
    // SAFETY: an aligned u64 in shared memory that outlives the reference's
    // use (callers use it at once).
    unsafe { AtomicU64::from_ptr(place) }
}
