/* The FP32 FMA peak of this machine's cores (the compute floor of the CPU backend): 12
 * independent AVX-512 FMA chains per thread, 2 threads, best of 3.
 *     gcc -O2 -mavx512f -fopenmp bench/cpu_fma_peak.c -o /tmp/peak && /tmp/peak          */
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>
int main(void){
  double best=0;
  for(int rep=0;rep<3;rep++){
  double t0=omp_get_wtime(); long iters=200000000/4; float out=0;
  #pragma omp parallel num_threads(2) reduction(+:out)
  {
    __m512 a[12]; __m512 b=_mm512_set1_ps(0.999999f), c=_mm512_set1_ps(1e-7f);
    for(int i=0;i<12;i++) a[i]=_mm512_set1_ps((float)i);
    for(long it=0;it<iters;it++){
      #pragma GCC unroll 12
      for(int i=0;i<12;i++) a[i]=_mm512_fmadd_ps(a[i],b,c);
    }
    for(int i=0;i<12;i++) out+=_mm512_reduce_add_ps(a[i]);
  }
  double dt=omp_get_wtime()-t0; double fl=2.0*iters*12*16*2/dt/1e9; if(fl>best)best=fl; if(out==1)printf("x");}
  printf("FP32 FMA peak (AVX-512, 2 threads): %.1f GFLOP/s\n",best);
}
