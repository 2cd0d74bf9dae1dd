/* A box of a JPEG decoded alone, by the system's libjpeg-turbo: columns by
 * jpeg_crop_scanline (whole iMCUs, so a few more than asked), rows above the box skipped
 * by jpeg_skip_scanlines (entropy-decoded, not transformed), rows below never read.
 * For studies/region_decode.py only: the floor of a center crop's preparation that
 * decodes the pixels its view covers and no more. Every libjpeg error returns -1 (its
 * error_exit jumps back here); a warning returns -3 (a damaged stream). */
#include <setjmp.h>
#include <stdio.h>
#include <jpeglib.h>

struct guard { struct jpeg_error_mgr pub; jmp_buf back; int warnings; };

static void on_error(j_common_ptr c) { longjmp(((struct guard *)c->err)->back, 1); }
static void on_message(j_common_ptr c, int level) {
    if (level < 0) ((struct guard *)c->err)->warnings++;
}

static void guarded(struct jpeg_decompress_struct *c, struct guard *g) {
    c->err = jpeg_std_error(&g->pub);
    g->pub.error_exit = on_error;
    g->pub.emit_message = on_message;
    g->warnings = 0;
}

/* rows [y0, y1) of the columns from *x (in) covering [x0, x1) as RGB into out, whose rows
 * are stride bytes apart; the columns decoded start at *x and are *width wide (out). */
int region_jpeg_decode(const unsigned char *data, unsigned long size, int x0, int y0, int x1,
                       int y1, unsigned char *out, int stride, int *x, int *width) {
    struct jpeg_decompress_struct c;
    struct guard g;
    guarded(&c, &g);
    if (setjmp(g.back)) { jpeg_destroy_decompress(&c); return -1; }
    jpeg_create_decompress(&c);
    jpeg_mem_src(&c, data, size);
    jpeg_read_header(&c, TRUE);
    if (x0 < 0 || y0 < 0 || x1 <= x0 || y1 <= y0 || x1 > (int)c.image_width
        || y1 > (int)c.image_height) {
        jpeg_destroy_decompress(&c);
        return -2;
    }
    c.out_color_space = JCS_RGB;
    jpeg_start_decompress(&c);
    JDIMENSION left = (JDIMENSION)x0, wide = (JDIMENSION)(x1 - x0);
    jpeg_crop_scanline(&c, &left, &wide);
    if ((long)wide * 3 > stride) { jpeg_destroy_decompress(&c); return -2; }
    if (y0 > 0) jpeg_skip_scanlines(&c, (JDIMENSION)y0);
    while ((int)c.output_scanline < y1) {
        JSAMPROW row = out + (size_t)(c.output_scanline - (JDIMENSION)y0) * (size_t)stride;
        jpeg_read_scanlines(&c, &row, 1);
    }
    *x = (int)left;
    *width = (int)wide;
    int warnings = g.warnings;
    jpeg_abort_decompress(&c);
    jpeg_destroy_decompress(&c);
    return warnings ? -3 : 0;
}
